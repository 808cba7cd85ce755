"""`python -m infer.load_test`: a real (small) run against a server it starts, and the bookkeeping that
makes a lost or mixed-up response fail the command."""
import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")

from infer import load_test  # noqa: E402


def test_small_load_test_runs_clean(tmp_path):
    rc = load_test.main(["--concurrency", "1,3", "--requests", "3", "--max-tokens", "32", "--output-dir",
                         str(tmp_path), "--", "--max-new-tokens", "32", "--block-size", "16", "--threads", "1"])
    assert rc == 0
    rows = json.loads((tmp_path / "load_test.json").read_text())["rows"]
    assert [r["concurrency"] for r in rows] == [1, 3]
    for r in rows:
        assert r["requests"] == 3 and r["failed"] == 0 and r["mismatched"] == 0
        assert r["tokens_per_s"] > 0 and 0 < r["p50_first_chunk_s"] <= r["p95_latency_s"]
    assert "| 3 | 3 | 0 | 0 |" in (tmp_path / "load_test.md").read_text()


def test_summary_counts_failures_and_mismatches():
    ok = {"text": "a", "tokens": 4, "nfe": 2, "latency": 1.0, "first_chunk": 0.5, "finish": "stop"}
    results = [ok, {**ok, "text": "b"}, {"error": "ReadTimeout: x", "latency": 9.0}]
    s = load_test.summarize(4, results, 2.0, reference=[ok, ok, ok])
    assert (s["failed"], s["mismatched"], s["tokens_per_s"]) == (1, 1, 4.0)
    assert s["errors"] == ["ReadTimeout: x"]


def test_bad_levels_are_one_line():
    from d2f.errors import UserError
    with pytest.raises(UserError, match="comma-separated integers"):
        load_test.parse_args(["--concurrency", "1,x"])
    with pytest.raises(UserError, match=">= 1"):
        load_test.parse_args(["--concurrency", "0"])


def test_server_options_replace_only_their_own_testbed_values():
    from infer import serve
    from infer.load_test import serve_args
    got = serve.parse_args(serve_args(["--windows", "union", "--tau-conf", "0.9"]))
    want = serve.parse_args(serve_args([]))
    assert got.windows == "union" and want.windows == "rows"
    assert got.decode_tau_conf == "0.9" and want.decode_tau_conf == "0.99"
    kept = ("decode_tau_add", "decode_tau_act", "decode_block_size", "decode_max_new_tokens")
    assert [getattr(got, k) for k in kept] == [getattr(want, k) for k in kept] == ["0.7", "0.95", "16", "128"]
