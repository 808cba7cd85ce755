"""infer.graphs.StaticForward: static shapes (padded windows, a whole-buffer cache, device offsets)
decode exactly what the plain model decodes, in every mode, batch 1 and N. On a CPU the static
forward runs eagerly; on a GPU the same forward is captured as a CUDA graph (measured by infer.bench)."""
from __future__ import annotations

import pytest
import torch

from d2f.cache import KVCache, StaticKVCache
from infer.api import DecodeConfig, generate
from infer.graphs import StaticForward
from tests.infer.helpers import random_model

CONFIGS = {
    "vanilla": dict(mode="vanilla", max_new_tokens=32, block_size=8, steps=16),
    "fast-dllm-prefix": dict(mode="fast-dllm", max_new_tokens=32, block_size=8, cache="prefix", threshold=0.3),
    "fast-dllm-dual": dict(mode="fast-dllm", max_new_tokens=32, block_size=8, cache="dual", threshold=0.3),
    "fast-dllm-dual-topk": dict(mode="fast-dllm", max_new_tokens=32, block_size=8, cache="dual", rule="topk",
                                steps=16),
    "d2f": dict(mode="d2f", max_new_tokens=32, block_size=8, tau_add=0.3, tau_act=0.5, tau_conf=0.3),
    "d2f-block-12": dict(mode="d2f", max_new_tokens=36, block_size=12, tau_add=0.3, tau_act=0.5, tau_conf=0.3),
    "ar": dict(mode="ar", max_new_tokens=20),
}
PROMPTS = [[5, 9, 17, 33], [40, 8, 21, 7, 3, 11, 19], [12, 14], [6, 60, 61, 62, 63, 64]]


def decode(model, name, bs):
    cfg = DecodeConfig(**CONFIGS[name])
    return [(r.token_ids, r.nfe) for r in generate(model, None, PROMPTS, cfg, batch_size=bs)]


@pytest.mark.parametrize("name,preset", [(name, preset) for name in CONFIGS
                                          for preset in (["tiny-ar"] if name == "ar" else ["tiny-llada", "tiny-dream"])])
def test_static_shapes_decode_the_same_tokens(name, preset):
    model = random_model(preset, std=0.3)
    fast = StaticForward(model)
    assert not fast.graphs  # a CPU: the same static shapes, eagerly
    for bs in (1, 4):
        want = decode(model, name, bs)
        assert decode(fast, name, bs) == want, (name, bs)
    assert sum(n for _, n in want) > len(PROMPTS)  # the settings make real multi-step decodes


@pytest.mark.parametrize("mode", ["fast-dllm", "d2f", "ar"])
def test_static_shapes_on_the_testbed_models(mode):
    from d2f.data.gsm8k import load_gsm8k
    from d2f.data.tokenizer import prompt_ids
    from infer.api import load
    from infer.bench import MODES

    model, tok = load(None, mode)
    prompts = [prompt_ids(tok, p["question"]) for p in load_gsm8k("testbed", split="test", limit=4)]
    names = {"fast-dllm": ["fast-dllm-prefix", "fast-dllm-dual"], "d2f": ["d2f"], "ar": ["ar"]}[mode]
    fast = StaticForward(model)
    for name in names:
        cfg = DecodeConfig(**MODES[name])
        for bs in (1, 4):
            want = [(r.token_ids, r.nfe) for r in generate(model, tok, prompts, cfg, batch_size=bs)]
            got = [(r.token_ids, r.nfe) for r in generate(fast, tok, prompts, cfg, batch_size=bs)]
            assert got == want, (name, bs)


def test_one_padded_forward_equals_the_plain_forward():
    from d2f.masks import block_causal
    model = random_model("tiny-llada", std=0.3)
    fast = StaticForward(model)
    x = torch.randint(3, 100, (2, 40))
    plain_cache, static_cache = KVCache.for_model(model, 2, 40), fast.make_cache(2, 40)
    pattern = block_causal(8, 8)
    with torch.no_grad():
        for lo, hi in [(0, 16), (16, 29), (16, 40)]:  # 13 rows run as a window of 16
            want = model(x[:, lo:hi], mask=pattern, cache=plain_cache, offset=lo)
            got = fast(x[:, lo:hi], mask=pattern, cache=static_cache, offset=lo)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want)


def test_static_cache_tensor_offset_and_fixed_batch():
    c = StaticKVCache(1, 2, 1, 8, 4)
    k = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 1, 3, 4)
    k_all, _ = c.update(0, torch.tensor(2), k, k)
    assert k_all.shape == (2, 1, 8, 4) and torch.equal(k_all[:, :, 2:5], k)
    assert c.kv_len(2, 3) == 8
    with pytest.raises(RuntimeError, match="compact=False"):
        c.select(torch.tensor([0]))


def test_cache_is_reused_and_cleared_between_calls():
    fast = StaticForward(random_model("tiny-llada", std=0.3))
    c = fast.make_cache(2, 100)
    c.k[0].fill_(1.0)
    assert fast.make_cache(2, 103) is c and c.k[0].abs().sum() == 0  # same buffers (graphs stay valid), zeroed
    assert fast.make_cache(3, 100) is not c  # another batch size needs other buffers


def test_static_forward_refuses_what_it_cannot_serve():
    from d2f_kernels import set_backend
    model = random_model("tiny-llada", std=0.3)
    fast = StaticForward(model)
    with pytest.raises(ValueError, match="only with the cache it made"):
        fast(torch.ones(1, 4, dtype=torch.long), cache=KVCache.for_model(model, 1, 8))
    set_backend(model, "reference")
    with pytest.raises(ValueError, match="sdpa attention backend"):
        StaticForward(model)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA model"):
        StaticForward(set_backend(model, "sdpa"), graphs=True)


def test_generate_cli_cuda_graphs_flag_same_answer(capsys):
    from infer import generate as cli

    def run(*extra):
        assert cli.main(["--mode", "d2f", "--no-stream", "--prompt", "Tom has 3 apples and buys 4 more. How many?",
                         *extra]) == 0
        out = capsys.readouterr().out
        return [line.split(" wall=")[0] for line in out.splitlines()]  # drop the timings

    assert run("--cuda-graphs") == run()


def test_load_cuda_graphs_refuses_a_transformers_model(tmp_path):
    from infer.api import DecodeConfigError, load
    from infer.bench import hf_causal_lm, share_weights
    hf = hf_causal_lm(share_weights(random_model("tiny-llada", dtype=torch.float32), causal=True))
    hf.save_pretrained(tmp_path)
    with pytest.raises(DecodeConfigError, match="cuda_graphs needs one of our model classes"):
        load(str(tmp_path), "ar", cuda_graphs=True)
