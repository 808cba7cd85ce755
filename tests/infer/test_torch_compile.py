"""infer.graphs.compiled: the forward under torch.compile decodes exactly what the plain model decodes, in
every mode, batch 1 and N, alone and under StaticForward (on a GPU the graphs then capture the compiled
kernels). Compiling takes seconds to a minute per mode on a CPU, so the decoding tests are slow tests."""
from __future__ import annotations

import json

import pytest
import torch
from torch._dynamo.eval_frame import OptimizedModule

from d2f.models.base import DiffusionLM
from infer.api import DecodeConfig, DecodeConfigError, generate, load
from infer.graphs import RECOMPILE_LIMIT, StaticForward, compiled
from tests.infer.helpers import random_model
from tests.infer.test_graphs import CONFIGS, PROMPTS


def test_load_compile_wraps_our_model_and_lifts_the_recompile_limit():
    import torch._dynamo
    with torch._dynamo.config.patch(recompile_limit=8):  # dynamo's default
        model, tok = load(None, "d2f", compile=True)
        assert torch._dynamo.config.recompile_limit == RECOMPILE_LIMIT
    assert isinstance(model, OptimizedModule) and isinstance(model._orig_mod, DiffusionLM)
    assert model.config is model._orig_mod.config  # what the decoders read passes through the wrapper
    graphed, _ = load(None, "d2f", compile=True, cuda_graphs=True)  # the static shapes around the compiled forward
    assert isinstance(graphed, StaticForward) and isinstance(graphed.model, OptimizedModule)


def test_compiled_specialises_floats_and_wraps_kernels_in_cpp_on_a_cpu(monkeypatch):
    # what makes a compiled call cheap around its kernels (docs/bench.md): float constants need no per-call guard,
    # and on a CPU the code calling the kernels is C++
    import torch._dynamo
    calls, real = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: calls.append(kw) or real(m, **kw))
    with torch._dynamo.config.patch(specialize_float=False):
        fast = compiled(random_model("tiny-llada", dtype=torch.float32))
        assert torch._dynamo.config.specialize_float is True
    assert isinstance(fast, OptimizedModule)
    assert calls == [dict(dynamic=True, options={"cpp_wrapper": True})]


def test_compile_without_a_cpp_compiler_is_one_clear_error():
    import torch._inductor.config as inductor
    default = inductor.cpp.cxx
    # config.patch, not monkeypatch: monkeypatch's undo deletes the entry from inductor's config module, and every
    # later compile in the process then fails
    with inductor.patch({"cpp.cxx": (None, "no-such-c++-compiler")}):
        with pytest.raises(DecodeConfigError, match="needs a C\\+\\+ compiler .* install g\\+\\+ or drop --compile"):
            load(None, "d2f", compile=True)
    assert inductor.cpp.cxx == default


def test_load_compile_refuses_a_transformers_model(tmp_path):
    from infer.bench import hf_causal_lm, share_weights
    hf = hf_causal_lm(share_weights(random_model("tiny-llada", dtype=torch.float32), causal=True))
    hf.save_pretrained(tmp_path)
    with pytest.raises(DecodeConfigError, match="compile needs one of our model classes"):
        load(str(tmp_path), "ar", compile=True)


def decode(model, name, bs):
    cfg = DecodeConfig(**CONFIGS[name])
    return [(r.token_ids, r.nfe) for r in generate(model, None, PROMPTS, cfg, batch_size=bs)]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiled_forward_decodes_the_same_tokens(name):
    model = random_model("tiny-ar" if name == "ar" else "tiny-llada", std=0.3)
    fast = compiled(model)
    static = StaticForward(compiled(model)) if name != "vanilla" else None
    for bs in (1, 4):
        want = decode(model, name, bs)
        with torch.profiler.profile() as prof:
            got = decode(fast, name, bs)
        assert got == want, (name, bs)
        # compiled code ran (not dynamo giving up and running the forward eagerly)
        assert any(e.key.startswith("Torch-Compiled Region") for e in prof.key_averages()), (name, bs)
        if static is not None:
            assert decode(static, name, bs) == want, (name, bs, "static")


# The baselines on their shipped float32 models (the tests above use float64 random models; D2F on the shipped
# student is the eval and server tests below)
TESTBED = {
    "vanilla": dict(mode="vanilla", max_new_tokens=64, block_size=32, steps=64),
    "fast-dllm-dual": dict(mode="fast-dllm", max_new_tokens=64, block_size=32, cache="dual", threshold=0.9),
    "ar": dict(mode="ar", max_new_tokens=64),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TESTBED))
def test_compiled_testbed_models_decode_the_same_tokens(name):
    from infer.api import encode_prompts, format_prompt
    from infer.eval import load_problems
    cfg = DecodeConfig(**TESTBED[name])
    eager, tok = load(None, cfg.mode)
    fast, _ = load(None, cfg.mode, compile=True)
    prompts = encode_prompts(tok, [format_prompt(tok, p["question"]) for p in load_problems("testbed", "test", 6)])
    for bs in (1, 4):
        want = [(r.token_ids, r.nfe) for r in generate(eager, tok, prompts, cfg, batch_size=bs)]
        assert [(r.token_ids, r.nfe) for r in generate(fast, tok, prompts, cfg, batch_size=bs)] == want, (name, bs)


@pytest.mark.slow
def test_eval_cli_compile_same_predictions_on_the_testbed(tmp_path):
    """The shipped student under --compile: the same answers and NFE as without, batch 4 (compaction)."""
    from infer.eval import main

    def run(*extra):
        out = tmp_path / ("compiled" if extra else "eager")
        main(["--mode", "d2f", "--limit", "6", "--batch-size", "4", "--max-new-tokens", "64", "--no-progress",
              "--output-dir", str(out), *extra])
        return [(r["output"], r["nfe"]) for r in map(json.loads, (out / "predictions.jsonl").open())]

    want = run()
    assert len(want) == 6 and run("--compile") == want


@pytest.mark.slow
def test_bench_compile_rows_replay_exactly(tmp_path):
    from infer.bench import main
    assert main(["--shapes", "tiny-llada", "--modes", "d2f,ar", "--batch-sizes", "1", "--backends", "sdpa",
                 "--no-hf", "--compile", "--output-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    labels = {(r["mode"], r["backend"]) for r in rows if r.get("replay_ok")}
    for mode in ("d2f", "ar"):
        assert {(mode, "sdpa+compile"), (mode, "sdpa+static+compile")} <= labels, labels


@pytest.mark.slow
def test_server_engine_with_a_compiled_model_answers_as_generate_alone(student):
    """The server's engine (requests joining a running batch, per-sample windows) on the compiled student: each
    answer is the one plain `generate` gives that prompt alone."""
    from infer.api import encode_prompts, format_prompt
    from infer.engine import Engine
    from tests.infer.test_serve import CFG, QUESTIONS, offline, run_all
    model, tok = student
    texts = [format_prompt(tok, q) for q in QUESTIONS]
    finals = run_all(Engine(compiled(model), tok, CFG, max_batch=8).start(), encode_prompts(tok, texts), CFG,
                     CFG.max_new_tokens, timeout=600)
    want = [offline(model, tok, t).token_ids for t in texts]
    assert [f["type"] for f in finals] == ["done"] * len(texts), finals
    assert [f["token_ids"] for f in finals] == want
