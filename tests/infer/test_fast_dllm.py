"""Fast-dLLM: the cached decoders refreshed every step == uncached decoding; topk == vanilla."""
import pytest
import torch

from helpers import random_model
from infer.api import DecodeConfig, generate

PROMPTS = [[5, 9, 17, 3, 44, 8], [21, 22]]


@pytest.mark.parametrize("name", ["tiny-llada", "tiny-dream"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("rule,kw", [("threshold", {"threshold": 0.5}), ("factor", {"factor": 2.0}),
                                     ("topk", {"steps": 8})])
def test_refreshed_cache_equals_no_cache(name, cache, rule, kw):
    model = random_model(name, seed=3)
    base = dict(mode="fast-dllm", max_new_tokens=16, block_size=8, rule=rule, **kw)
    ref = generate(model, None, PROMPTS, DecodeConfig(cache="none", **base), trace=True)
    got = generate(model, None, PROMPTS, DecodeConfig(cache=cache, **base), trace=True,
                   refresh_every_step=True)
    for r, g in zip(ref, got):
        assert g.token_ids == r.token_ids
        assert g.nfe == r.nfe
        assert [s["committed"] for s in g.trace] == [s["committed"] for s in r.trace]


def test_topk_without_cache_is_vanilla():
    model = random_model("tiny-llada", seed=4)
    kw = dict(max_new_tokens=16, block_size=4, steps=8)
    v = generate(model, None, PROMPTS, DecodeConfig(mode="vanilla", **kw))
    f = generate(model, None, PROMPTS, DecodeConfig(mode="fast-dllm", cache="none", rule="topk", **kw))
    assert [r.token_ids for r in v] == [r.token_ids for r in f]


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_forward_ranges_and_block_first_step(cache):
    """The first step of each block is a full forward; later steps forward x[block:] (prefix)
    or only the block (dual). Every answer position gets decoded; NFE counts every forward."""
    model = random_model("tiny-llada", seed=5)
    cfg = DecodeConfig(mode="fast-dllm", max_new_tokens=16, block_size=8, cache=cache, threshold=0.99)
    [res] = generate(model, None, [PROMPTS[0]], cfg, trace=True)
    P, L = 6, 22
    prev_block = None
    for step in res.trace:
        b = step["block"]
        if b != prev_block:
            assert step["forward"] == [0, L]
        else:
            assert step["forward"] == ([P + 8 * b, L] if cache == "prefix" else [P + 8 * b, P + 8 * b + 8])
        prev_block = b
    assert res.nfe == len(res.trace) > 2
    assert sum(len(s["committed"]) for s in res.trace) >= res.num_tokens
    assert 127 not in res.token_ids


def test_threshold_commits_all_confident_and_at_least_one():
    model = random_model("tiny-llada", seed=6)
    cfg = DecodeConfig(mode="fast-dllm", max_new_tokens=16, block_size=16, cache="none", threshold=0.6)
    [res] = generate(model, None, [PROMPTS[0]], cfg, trace=True)
    assert all(len(s["committed"]) >= 1 for s in res.trace)
    assert sum(len(s["committed"]) for s in res.trace) == 16 or model.config.eos_token_id in res.token_ids


@pytest.mark.parametrize("name", ["tiny-llada", "tiny-dream"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cache_plumbing_is_exact_when_the_approximation_is(name, cache):
    """Under causal attention a row's keys/values never depend on later rows, so the prefix and
    dual caches are exact: they must then reproduce uncached decoding token for token. This
    checks offsets, overwrites and Dream's extra row without the test re-implementing the cache."""
    from infer import fast_dllm
    from infer.batch import make_batch
    from infer.steps import StepLog
    model = random_model(name, seed=9, is_causal=True)  # mask=None -> causal attention
    outs = []
    for c in ("none", cache):
        cfg = DecodeConfig(mode="fast-dllm", max_new_tokens=16, block_size=8, cache=c, threshold=0.3)
        batch = make_batch([PROMPTS[0]], 16, model.config.mask_token_id, 0)
        log = StepLog(1, trace=True)
        with torch.no_grad():
            fast_dllm.decode(model, batch, cfg, log)
        outs.append((batch.answer().tolist(), log.nfe, [r["committed"] for r in log.records[0]]))
    assert outs[0] == outs[1]
    assert len(outs[0][2]) < 16  # several tokens per step: later steps really used the cache
