"""Batch invariance: every sample of a left-padded batch decodes exactly as it does alone,
including samples that stop early (EOS) next to ones that go on."""
import pytest

from helpers import random_model
from infer.api import DecodeConfig, generate
from infer.batch import make_batch

PROMPTS = [[5, 9, 17, 3, 44, 8, 2, 60], [21, 22, 23], [70, 71, 72, 73, 74]]

CONFIGS = {
    "vanilla": dict(mode="vanilla", max_new_tokens=16, block_size=8, steps=8),
    "fast-none": dict(mode="fast-dllm", max_new_tokens=16, block_size=8, cache="none", threshold=0.5),
    "fast-prefix": dict(mode="fast-dllm", max_new_tokens=16, block_size=8, cache="prefix", threshold=0.5),
    "fast-dual": dict(mode="fast-dllm", max_new_tokens=16, block_size=8, cache="dual", rule="factor", factor=2.0),
    "d2f": dict(mode="d2f", max_new_tokens=16, block_size=4, tau_add=0.3, tau_act=0.6, tau_conf=0.5),
    "d2f-recompute": dict(mode="d2f", max_new_tokens=16, block_size=4, tau_add=0.3, tau_act=0.6, tau_conf=0.5,
                          cache="none"),
}


def test_left_padding_layout():
    b = make_batch([[1, 2, 3], [4]], gen_len=2, fill_id=9, pad_id=0)
    assert b.x.tolist() == [[1, 2, 3, 9, 9], [0, 0, 4, 9, 9]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]
    assert b.key_valid.tolist() == [[True] * 5, [False, False, True, True, True]]
    assert b.prompt_len == 3 and b.answer().tolist() == [[9, 9], [9, 9]]
    assert make_batch([[1, 2]], 2, 9, 0).key_valid is None


def check_invariance(model, cfg):
    together = generate(model, None, PROMPTS, cfg)
    alone = [generate(model, None, [p], cfg)[0] for p in PROMPTS]
    for t, a in zip(together, alone):
        assert t.token_ids == a.token_ids
        assert t.nfe == a.nfe
    return together


@pytest.mark.parametrize("name", ["tiny-llada", "tiny-dream"])
@pytest.mark.parametrize("which", list(CONFIGS))
def test_batch_equals_alone(name, which):
    model = random_model(name, seed=11)
    check_invariance(model, DecodeConfig(**CONFIGS[which]))


@pytest.mark.parametrize("name", ["tiny-llada", "tiny-dream"])
@pytest.mark.parametrize("which", ["fast-prefix", "fast-dual", "d2f"])
def test_early_finisher_does_not_change_others(which, name):
    """Make one sample stop early by declaring a token it emits to be EOS."""
    cfg = DecodeConfig(**CONFIGS[which])
    model = random_model(name, seed=11)
    free = generate(model, None, PROMPTS, cfg)
    # a token in sample 1's answer (not its last position) that sample 0 and 2 do not start with
    eos = free[1].token_ids[len(free[1].token_ids) // 2]
    model.config = model.config.replace(eos_token_id=eos)
    res = check_invariance(model, cfg)
    assert res[1].token_ids[-1] == eos and res[1].num_tokens < 16


@pytest.mark.parametrize("which", ["fast-prefix", "d2f", "ar", "ar-hf"])
def test_dropping_finished_samples_changes_nothing(which):
    """Decoders drop finished samples from the batch (and cache); keeping them gives the same."""
    if which.startswith("ar"):
        cfg = DecodeConfig(mode="ar", max_new_tokens=12)
        if which == "ar-hf":
            from test_ar import hf_model
            model = hf_model("qwen2")
        else:
            model = random_model("tiny-ar", seed=11)
    else:
        cfg = DecodeConfig(**CONFIGS[which])
        model = random_model("tiny-llada", seed=11)
    free = generate(model, None, PROMPTS, cfg)
    eos = free[1].token_ids[len(free[1].token_ids) // 2]
    if which == "ar-hf":
        model.config.eos_token_id = model.generation_config.eos_token_id = eos
    else:
        model.config = model.config.replace(eos_token_id=eos)
    a = generate(model, None, PROMPTS, cfg, trace=True)
    b = generate(model, None, PROMPTS, cfg, trace=True, compact=False)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.nfe for r in a] == [r.nfe for r in b]
    assert [r.trace for r in a] == [r.trace for r in b]
    assert a[1].num_tokens < max(r.num_tokens for r in a)  # someone did finish early
