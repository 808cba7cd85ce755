"""infer.bench at tiny shapes: the replay reproduces the recorded schedules exactly (every mode,
batch 1 and N), the transformers models share our weights and decode the same tokens, the CLI
writes its table."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from infer import bench
from tests.infer.helpers import random_model


@pytest.fixture(scope="module")
def trace():
    return json.loads(bench.TRACES.read_text())


def test_shipped_traces_cover_every_mode(trace):
    assert set(trace["modes"]) == set(bench.MODES)
    for name, rec in trace["modes"].items():
        assert rec["config"] == bench.MODES[name]
        assert len(rec["samples"]) >= 8
        for s in rec["samples"]:
            G = rec["config"]["max_new_tokens"]
            assert len(s["order"]) == len(s["tokens"]) == G
            # every forward commits something, so the step a row is at can be read off its commits
            assert sorted(set(o for o in s["order"] if o >= 0)) == list(range(s["nfe"]))


def test_trace_to_schedule():
    records = [{"committed": [2, 0], "tokens": [7, 5]}, {"committed": [1], "tokens": [9]}]
    assert bench.trace_to_schedule(records, 4) == ([0, 1, 0, -1], [5, 9, 7, -1])


@pytest.mark.parametrize("shape", ["tiny-llada", "tiny-dream"])
@pytest.mark.parametrize("batch", [1, 3])
def test_replay_is_exact_in_every_mode(trace, shape, batch):
    model = random_model(shape, dtype=torch.float32)
    ar = bench.share_weights(model, causal=True)
    for name in bench.MODES:
        row = bench.run_mode(ar if name == "ar" else model, trace, name, batch, 3, 40, None, warmup=False)
        want = trace["modes"][name]["samples"][:3]
        assert row["replay_ok"], (shape, name)
        assert row["nfe"] == pytest.approx(sum(s["nfe"] for s in want) / 3)
        assert row["answer_len"] == pytest.approx(sum(s["num_tokens"] for s in want) / 3)


def test_replay_detects_a_schedule_it_cannot_follow(trace):
    # the check compares every replayed answer and NFE with the trace: a trace claiming one forward
    # more than its schedule needs must be reported, not timed as if it were real decoding
    bad = copy.deepcopy(trace)
    s = bad["modes"]["d2f"]["samples"][0]
    s["nfe"] += 1  # claims one forward more than the schedule has
    row = bench.run_mode(random_model("tiny-llada", dtype=torch.float32), bad, "d2f", 1, 1, 40, None, warmup=False)
    assert row["replay_ok"] is False


def test_replay_needs_distinct_prompt_lengths():
    model = random_model("tiny-llada", dtype=torch.float32)
    with pytest.raises(ValueError, match="distinct prompt length"):
        bench.Replay(model, [[0], [0]], [[5], [5]], [10, 10])


@pytest.mark.parametrize("shape", ["tiny-llada", "tiny-dream"])
def test_transformers_model_shares_weights_and_decodes_the_same(shape):
    from infer import ar as ar_decoder
    from infer.api import DecodeConfig
    from infer.batch import make_batch
    from infer.steps import StepLog

    ours = bench.share_weights(random_model(shape, std=0.3, dtype=torch.float32), causal=True)
    hf = bench.hf_causal_lm(ours)
    assert hf.get_input_embeddings().weight.data_ptr() == ours.get_input_embeddings().weight.data_ptr()
    ids = torch.tensor([[5, 9, 17, 33, 40, 8, 21]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-5, atol=1e-5)
        want = hf.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)[0, ids.shape[1]:]
    batch = make_batch([ids[0].tolist()], 24, 0, 0)
    ar_decoder.decode(ours, batch, DecodeConfig(mode="ar", max_new_tokens=24), StepLog(1), eos_id=None)
    assert batch.answer()[0].tolist() == want.tolist()


def test_cli_writes_table(tmp_path):
    rc = bench.main(["--shapes", "tiny-llada", "--modes", "vanilla,d2f,fast-dllm-dual,ar", "--batch-sizes", "1,2",
                     "--samples", "2", "--samples-b1", "1", "--backends", "sdpa", "--prompt-len", "30",
                     "--output-dir", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    # per batch size: the modes in the order given, each eager and under static shapes (CUDA graphs on a
    # GPU; vanilla too, whose forwards have no cache), then transformers' generate
    assert [(r["mode"], r["backend"], r["batch"]) for r in rows] == [
        (m, be, b) for b in (1, 2) for m, be in (("vanilla", "sdpa"), ("vanilla", "sdpa+static"), ("d2f", "sdpa"),
                                                 ("d2f", "sdpa+static"), ("fast-dllm-dual", "sdpa"),
                                                 ("fast-dllm-dual", "sdpa+static"), ("ar", "sdpa"),
                                                 ("ar", "sdpa+static"), ("hf-generate", "transformers"))]
    assert all(r["replay_ok"] in (True, None) and r["tokens_per_s"] > 0 and r["x_floor"] > 0 for r in rows)
    md = (tmp_path / "results.md").read_text()
    assert "| tiny-llada | d2f | sdpa | 2 |" in md and "transformers generate" in md


@pytest.mark.parametrize("argv, msg", [
    (["--shapes", "llada-9b"], "unknown shape"),
    (["--modes", "d2f,foo"], "unknown mode"),
    (["--batch-sizes", "0"], "positive"),
    (["--batch-sizes", "a"], "integers"),
    (["--traces", "/nonexistent/t.json"], "no trace file"),
])
def test_cli_bad_arguments_one_line(argv, msg, tmp_path):
    from d2f.errors import UserError
    with pytest.raises(UserError) as e:
        bench.main(argv + ["--output-dir", str(tmp_path)])
    assert msg in str(e.value) and "\n" not in str(e.value)
