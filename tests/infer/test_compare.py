"""infer.compare end to end: the table, results.json and pareto.png, consistent with each config's own
predictions; missing models skipped with a reason; config errors named. Runs on tiny checkpoints always, and
on the shipped testbed (`--limit 2`) when it is there."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
import yaml

from d2f import testbed
from d2f.yaml_config import ConfigError
from d2f.models import build_model, preset_config, save_pretrained
from infer import compare as C
from infer import eval as E
from infer.api import generate


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    from d2f.data.gsm import make_problems
    from d2f.data.tokenizer import train_tokenizer

    problems = make_problems("train", 200, seed=0)
    return train_tokenizer([p["question"] for p in problems] + [p["answer"] for p in problems], vocab_size=300)


def tiny_checkpoint(path: Path, is_causal: bool = False, seed: int = 0) -> str:
    cfg = preset_config("tiny-llada").replace(vocab_size=300, embedding_size=300, mask_token_id=2, eos_token_id=1,
                                              pad_token_id=0, is_causal=is_causal)
    save_pretrained(build_model(cfg, dtype=torch.float32, seed=seed), path)
    tiny_tokenizer().save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    from d2f.data.gsm import make_problems

    data = root / "probs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in make_problems("test", 5, seed=7)))
    teacher, ar = tiny_checkpoint(root / "teacher"), tiny_checkpoint(root / "ar", is_causal=True, seed=1)
    gen = {"max_new_tokens": 16}
    cfg = {
        "data": str(data), "limit": 3, "shots": 0, "baseline": "vanilla",
        "configs": {
            "vanilla": {"model": teacher, "mode": "vanilla", "block_size": 8, "steps": 16, **gen},
            "fast-dual": {"model": teacher, "mode": "fast-dllm", "block_size": 8, "cache": "dual", **gen},
            "d2f": {"model": teacher, "mode": "d2f", "block_size": 4, "tau_add": 0.5, **gen,
                    "sweep": {"param": "tau_conf+tau_act", "values": [0.9, 0.5]}},
            "missing-student": {"model": teacher, "adapter": str(root / "no" / "such" / "adapter"), "mode": "d2f",
                                "block_size": 4, **gen},
            "ar": {"model": ar, "mode": "ar", **gen},
        },
    }
    path = root / "cmp.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return root, path


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_compare_writes_consistent_table_json_and_plot(tiny_setup, capsys):
    root, cfg_path = tiny_setup
    out = root / "out"
    report = C.main(["--config", str(cfg_path), "--output-dir", str(out), "--no-progress"])
    printed = capsys.readouterr()

    names = ["vanilla", "fast-dual", "d2f[tau_conf+tau_act=0.9]", "d2f[tau_conf+tau_act=0.5]", "ar"]
    assert [r["config"] for r in report["results"]] == names
    # the missing adapter is skipped, with the config named and the reason given, and the others ran
    assert [s["config"] for s in report["skipped"]] == ["missing-student"]
    assert "SKIPPED missing-student" in printed.err and "adapter" in report["skipped"][0]["reason"]

    saved = json.loads((out / "results.json").read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    for key in ("device", "dtype", "cpu", "cpu_cores", "torch", "transformers"):
        assert saved["machine"][key], key
    assert saved["settings"]["n_problems"] == 3

    base_tps = report["results"][0]["tokens_per_s"]
    for r in report["results"]:
        preds = _jsonl(C.row_dir(out, r["config"]) / E.PREDICTIONS)
        assert len(preds) == 3 and r["n"] == 3
        assert r["accuracy"] == sum(p["correct"] for p in preds) / 3
        assert r["tokens_total"] == sum(p["tokens"] for p in preds)
        assert r["nfe_mean"] == pytest.approx(sum(p["nfe"] for p in preds) / 3)
        assert r["tokens_per_s"] == pytest.approx(r["tokens_total"] / sum(p["wall_time"] for p in preds))
        assert r["tokens_per_forward"] == pytest.approx(r["tokens_total"] / r["nfe_total"])
        assert r["speedup"] == pytest.approx(r["tokens_per_s"] / base_tps)
    assert report["results"][0]["nfe_mean"] == 16  # vanilla: NFE = steps
    assert report["results"][2]["decode"]["tau_conf"] == report["results"][2]["decode"]["tau_act"] == 0.9
    assert report["results"][3]["sweep"] == {"param": "tau_conf+tau_act", "value": 0.5}

    table = (out / "results.md").read_text()
    assert "| " + " | ".join(C.COLUMNS) + " |" in table
    assert table in printed.out  # the table is printed at the end
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(names)
    for line, r in zip(rows, report["results"]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == r["config"]
        assert cells[1].startswith(f"{100 * r['accuracy']:.1f}%")
        assert float(cells[2]) == pytest.approx(r["tokens_per_s"], abs=0.06)
        assert cells[3] == f"{r['speedup']:.2f}x"
        assert float(cells[4]) == pytest.approx(r["nfe_mean"], abs=0.06)
        assert float(cells[6]) == pytest.approx(r["answer_tokens_mean"], abs=0.06)
    assert "Skipped missing-student" in table

    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_compare_only_and_overrides(tiny_setup):
    root, cfg_path = tiny_setup
    out = root / "only"
    report = C.main(["--config", str(cfg_path), "--output-dir", str(out), "--no-progress", "--only", "ar,fast-dual",
                     "--limit", "2", "configs.fast-dual.threshold=0.5", "warmup=false"])
    assert [r["config"] for r in report["results"]] == ["fast-dual", "ar"]
    assert report["results"][0]["decode"]["threshold"] == 0.5 and report["results"][0]["n"] == 2
    assert report["baseline"] is None and report["results"][0]["speedup"] is None  # vanilla did not run
    assert "n/a" in (out / "results.md").read_text()


def test_compare_run_again_resumes_without_decoding(tiny_setup):
    root, cfg_path = tiny_setup
    cc = C.load_config(C.CompareConfig, cfg_path, ["limit=2"])
    calls = []

    def counting(*args, **kw):
        calls.append(len(args[2]))
        return generate(*args, **kw)

    first = C.run_compare(cc, root / "again", only=["fast-dual", "ar"], progress=False, generate_fn=counting)
    assert calls == [1, 1, 1] * 2  # per row: one warm-up, then the two problems
    calls.clear()
    second = C.run_compare(cc, root / "again", only=["fast-dual", "ar"], progress=False, generate_fn=counting)
    assert calls == []  # everything was in the predictions files: no warm-up, no decoding
    keep = ("accuracy", "tokens_total", "nfe_total", "tokens_per_s", "latency_p50_s")
    assert [{k: r[k] for k in keep} for r in second["results"]] == [{k: r[k] for k in keep} for r in first["results"]]


def test_compare_compile_loads_compiled_models_and_warms_up_on_a_whole_batch(tiny_setup):
    """compile=true: every row's model is loaded with compile=True, and the warm-up decodes the first batch in
    full (a one-block warm-up would leave specialisations to compile inside the timings)."""
    from infer.api import load
    root, cfg_path = tiny_setup
    cc = C.load_config(C.CompareConfig, cfg_path, ["limit=3", "batch_size=2", "compile=true"])
    loads, calls = [], []

    def fake_load(*args, **kw):  # the real load without compiling (tests/infer/test_torch_compile.py compiles)
        loads.append(kw.pop("compile", False))
        return load(*args, **kw)

    def counting(model, tok, prompts, cfg, **kw):
        calls.append((len(prompts), cfg.max_new_tokens))
        return generate(model, tok, prompts, cfg, **kw)

    report = C.run_compare(cc, root / "compiled", only=["fast-dual"], progress=False, load_fn=fake_load,
                           generate_fn=counting)
    n = report["results"][0]["decode"]["max_new_tokens"]
    assert loads == [True]
    assert calls == [(2, n), (2, n), (1, n)]  # the warm-up: the whole first batch at full length; then the run


def test_config_errors_name_the_bad_key(tiny_setup):
    _, cfg_path = tiny_setup
    with pytest.raises(ConfigError, match="tau_ad"):
        C.main(["--config", str(cfg_path), "configs.d2f.tau_ad=0.3"])
    with pytest.raises(ConfigError, match="nope"):
        C.main(["--config", str(cfg_path), "--only", "nope"])
    with pytest.raises(ConfigError, match="sweep"):
        C.expand_rows({"x": {"mode": "d2f", "sweep": {"param": "tau_conf"}}})
    with pytest.raises(ValueError, match="block_size"):
        C.expand_rows({"x": {"mode": "d2f", "max_new_tokens": 10, "block_size": 4}})


def test_default_config_parses_into_the_documented_rows():
    cc = C.load_config(C.CompareConfig, C.DEFAULT_CONFIG)
    rows = C.expand_rows(cc.configs)
    names = [r.name for r in rows]
    assert names[:4] == ["teacher-vanilla", "teacher-fast-dllm-prefix", "teacher-fast-dllm-dual",
                         "teacher-fast-dllm-dual-0.99"]
    assert names[8] == "student-d2f"
    # Fast-dLLM dual sweeps its threshold over the values D2F sweeps tau_conf = tau_act over
    fast = [r for r in rows if r.group == "teacher-fast-dllm-dual-sweep"]
    d2f = [r for r in rows if r.group == "student-d2f-sweep"]
    assert [r.decode.threshold for r in fast] == [r.decode.tau_conf for r in d2f] == [0.999, 0.99, 0.95, 0.9]
    by_name = {r.name: r.decode for r in rows}  # D2F and its Fast-dLLM match decode at the same threshold
    assert by_name["student-d2f"].tau_conf == by_name["teacher-fast-dllm-dual-0.99"].threshold == 0.99
    assert names[-1] == "ar" and sum(r.group == "student-d2f-sweep" for r in rows) == 4
    assert {r.decode.mode for r in rows} == {"vanilla", "fast-dllm", "d2f", "ar"}
    assert cc.baseline == "teacher-vanilla"


@pytest.mark.parametrize("name, rows, d2f_block, tau_add", [
    ("compare_llada.yaml", ["llada-vanilla", "llada-fast-dllm-prefix", "llada-fast-dllm-dual", "llada-d2f",
                            "qwen2.5-7b-ar"], 64, 0.7),
    ("compare_dream.yaml", ["dream-vanilla", "dream-fast-dllm-dual", "dream-d2f", "dream-d2f-sweep[tau_conf+tau_act=0.95]",
                            "dream-d2f-sweep[tau_conf+tau_act=0.9]", "dream-d2f-sweep[tau_conf+tau_act=0.85]",
                            "llama3-8b-ar"], 32, 0.1),
])
def test_gpu_configs_parse_into_the_public_settings(name, rows, d2f_block, tau_add):
    """The shipped 8B/7B configs validate offline (no weights needed) and carry the settings of docs/design.md §3."""
    cc = C.load_config(C.CompareConfig, C.REPO_ROOT / "configs" / name)
    expanded = C.expand_rows(cc.configs)
    assert [r.name for r in expanded] == rows
    assert (cc.data, cc.device, cc.dtype, cc.chat, cc.limit) == ("hub", "cuda", "bfloat16", "off", None)
    assert cc.baseline == rows[0]
    gen = expanded[0].decode.max_new_tokens
    for r in expanded:
        assert r.decode.max_new_tokens == gen and "/" in r.model  # hub ids, one answer budget per file
        if r.decode.mode == "vanilla":
            assert (r.decode.block_size, r.decode.steps) == (32, gen)
        if r.decode.mode == "fast-dllm":
            assert (r.decode.block_size, r.decode.rule, r.decode.threshold) == (32, "threshold", 0.9)
        if r.decode.mode == "d2f":
            assert r.adapter.startswith("SJTU-Deng-Lab/D2F_")
            assert (r.decode.block_size, r.decode.tau_add) == (d2f_block, tau_add)
    assert {r.decode.mode for r in expanded} == {"vanilla", "fast-dllm", "d2f", "ar"}


def test_student_missing_from_the_testbed_is_skipped(tiny_setup, monkeypatch, capsys):
    root, _ = tiny_setup
    teacher = str(root / "teacher")
    monkeypatch.setattr(testbed, "TESTBED_DIR", root / "empty-testbed")
    cc = C.CompareConfig(data=str(root / "probs.jsonl"), limit=1, shots=0, configs={
        "teacher-vanilla": {"model": teacher, "mode": "vanilla", "max_new_tokens": 8, "block_size": 8, "steps": 8},
        "student-d2f": {"mode": "d2f", "max_new_tokens": 8, "block_size": 4}})
    report = C.run_compare(cc, root / "skip", progress=False)
    assert [r["config"] for r in report["results"]] == ["teacher-vanilla"]
    [skip] = report["skipped"]
    assert skip["config"] == "student-d2f" and "student" in skip["reason"]
    assert "SKIPPED student-d2f" in capsys.readouterr().err
    only_missing = C.CompareConfig(data=str(root / "probs.jsonl"), limit=1, configs={"student-d2f": {"mode": "d2f"}})
    with pytest.raises(RuntimeError, match="every config was skipped"):
        C.run_compare(only_missing, root / "skip2", progress=False)


@pytest.mark.skipif(not (testbed.TESTBED_DIR / "teacher").is_dir(), reason="the testbed teacher is not built yet")
def test_compare_on_the_testbed(tmp_path):
    report = C.main(["--limit", "2", "--output-dir", str(tmp_path), "--no-progress",
                     "configs.student-d2f-sweep.enabled=false"])
    ran = {r["config"] for r in report["results"]}
    assert {"teacher-vanilla", "teacher-fast-dllm-prefix", "teacher-fast-dllm-dual"} <= ran
    assert ran | {s["config"] for s in report["skipped"]} >= {"student-d2f", "ar"}
    for r in report["results"]:
        assert r["n"] == 2 and r["tokens_total"] > 0
    assert (tmp_path / "results.md").exists() and (tmp_path / "pareto.png").exists()


def test_pareto_front_keeps_rows_nothing_beats_on_both_axes():
    rows = [{"config": n, "accuracy": a, "tokens_per_s": t}
            for n, a, t in [("slow-good", 0.8, 10), ("fast-ok", 0.7, 50), ("dominated", 0.6, 40), ("fastest", 0.5, 90),
                            ("tie", 0.7, 50)]]
    assert [r["config"] for r in C.pareto_front(rows)] == ["slow-good", "fast-ok", "tie", "fastest"]


def _point(group, mode, value, acc, tps):
    return {"config": f"{group}[{value}]", "group": group, "mode": mode, "accuracy": acc, "tokens_per_s": tps,
            "sweep": {"param": "t", "value": value}}


def test_matched_speedups_interpolate_on_the_other_curve():
    fast = [_point("fast", "fast-dllm", 0.99, 0.70, 100.0), _point("fast", "fast-dllm", 0.9, 0.50, 300.0),
            _point("fast", "fast-dllm", 0.95, 0.45, 200.0)]  # beaten by (0.50, 300) on both axes: off the front
    d2f = [_point("d2f", "d2f", 0.99, 0.60, 400.0), _point("d2f", "d2f", 0.9, 0.40, 900.0)]
    assert C.interpolate_speed(fast, 0.60) == pytest.approx(200.0)  # halfway between (0.5, 300) and (0.7, 100)
    assert C.interpolate_speed(fast, 0.75) is None and C.interpolate_speed(fast, 0.45) is None
    m = C.matched_speedups(fast + d2f + [_point("other-d2f", "d2f", 0.9, 0.1, 1.0)])
    # every D2F sweep against every non-D2F sweep, never two D2F sweeps against each other
    assert [(x["d2f"], x["against"]) for x in m] == [("d2f[0.99]", "fast"), ("d2f[0.9]", "fast"),
                                                      ("other-d2f[0.9]", "fast")]
    assert m[0]["speedup_at_accuracy"] == pytest.approx(2.0)  # 400 / 200
    assert m[0]["speedup_at_value"] == pytest.approx(4.0) and m[0]["other_accuracy_at_value"] == 0.70
    assert m[1]["speedup_at_accuracy"] is None  # 40% is below every Fast-dLLM point
    assert m[1]["speedup_at_value"] == pytest.approx(3.0)
    table = C.matched_table(m)
    assert "| d2f[0.99] | fast | 60.0% | 400.0 | 200.0 | 2.00x | 70.0% | 4.00x |" in table
    assert "| d2f[0.9] | fast | 40.0% | 900.0 | - | - | 50.0% | 3.00x |" in table
