"""Samples joining a running decode (`infer.d2f_decoder.steps` / `infer.ar.steps` + `Changes`, what `infer.serve`
does): each sample's answer and NFE equal its decode alone, whatever joins, leaves or widens the buffer."""
import dataclasses

import pytest
import torch

from helpers import random_model
from infer import ar, d2f_decoder, fast_dllm, vanilla
from infer.api import DecodeConfig, generate
from infer.batch import make_batch
from infer.steps import Changes, StepLog

PROMPTS = [[5, 9, 17, 3, 44, 8, 2], [21, 22, 23], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [30, 31, 32, 33]]


def alone(model, prompt, gen_len, cfg):
    [r] = generate(model, None, [prompt], dataclasses.replace(cfg, max_new_tokens=gen_len))
    return r.token_ids, r.nfe


def run_with_joins(model, cfg, schedule, cancel=None, use_cache=True, windows="union"):
    """schedule: {step: [(prompt, gen_len), ...]} samples joining before that forward (step 0: the
    start). cancel: {step: [sample index]}. Returns {index: answer tokens (cut at EOS)}, NFE list."""
    mask_id, eos_id = model.config.mask_token_id, model.config.eos_token_id
    fill = 0 if cfg.mode == "ar" else mask_id
    first = schedule[0]
    G0 = max(g for _, g in first)
    batch = make_batch([p for p, _ in first], G0, fill, fill)
    log = StepLog(len(first))
    extra = {"d2f": {"use_cache": use_cache, "windows": windows}, "ar": {"eos_id": eos_id, "use_cache": use_cache}}.get(cfg.mode, {})
    module = {"d2f": d2f_decoder, "ar": ar, "fast-dllm": fast_dllm, "vanilla": vanilla}[cfg.mode]
    gen = module.steps(model, batch, cfg, log, gen_lens=[g for _, g in first], **extra)
    budgets = {i: g for i, (_, g) in enumerate(first)}
    answers, step = {}, 0
    try:
        finished = next(gen)
        while True:
            for i, ans in finished:
                answers[i] = ans[:budgets[i]].tolist()
            step += 1
            change = Changes(cancel=(cancel or {}).get(step, []))
            if step in schedule:
                new = schedule[step]
                ids = log.grow(len(new))
                budgets.update({i: g for i, (_, g) in zip(ids, new)})
                change.join = make_batch([p for p, _ in new], max(g for _, g in new), fill, fill)
                change.join_ids, change.gen_lens = ids, [g for _, g in new]
            finished = gen.send(change)
    except StopIteration:
        pass
    out = {}
    for i, toks in answers.items():
        if eos_id is not None and eos_id in toks:
            toks = toks[:toks.index(eos_id) + 1]
        out[i] = toks
    return out, log.nfe


@pytest.mark.parametrize("name", ["tiny-llada", "tiny-dream"])
@pytest.mark.parametrize("use_cache,windows", [(True, "union"), (False, "union"), (True, "rows")])
def test_joining_samples_decode_as_alone(name, use_cache, windows):
    model = random_model(name, seed=7)
    cfg = DecodeConfig(mode="d2f", max_new_tokens=24, block_size=4, tau_add=0.1, tau_act=0.5, tau_conf=0.3)
    # joins with a longer prompt (the buffer moves right), a longer budget (it grows), a shorter
    # budget than the buffer's, and one joining after the first samples may have finished
    schedule = {0: [(PROMPTS[0], 12), (PROMPTS[1], 8)], 2: [(PROMPTS[2], 24)], 3: [(PROMPTS[3], 8)],
                5: [(PROMPTS[1], 16), (PROMPTS[0], 4)]}
    got, nfe = run_with_joins(model, cfg, schedule, use_cache=use_cache, windows=windows)
    samples = [s for step in sorted(schedule) for s in schedule[step]]
    assert sorted(got) == list(range(len(samples)))
    multi = 0
    for i, (prompt, gen_len) in enumerate(samples):
        ref, ref_nfe = alone(model, prompt, gen_len, cfg)
        assert [t for t in got[i] if t != model.config.mask_token_id] == ref, f"sample {i}"
        assert nfe[i] == ref_nfe, f"sample {i}"
        multi += len(ref) > ref_nfe
    assert multi  # the pipeline did commit several tokens per forward somewhere


@pytest.mark.parametrize("use_cache", [True, False])
def test_ar_joining_samples_decode_as_alone(use_cache):
    """AR: a sample joins at the next token; its prompt ends where the others write next (the buffer moves
    right when its prompt is longer than that), and its budget may exceed the buffer's."""
    model = random_model("tiny-ar", seed=12)
    cfg = DecodeConfig(mode="ar", max_new_tokens=12)
    schedule = {0: [(PROMPTS[1], 6), (PROMPTS[3], 12)], 1: [(PROMPTS[2], 9)], 2: [(PROMPTS[0], 20)],
                4: [(PROMPTS[1], 3), (PROMPTS[2], 12)]}
    got, nfe = run_with_joins(model, cfg, schedule, cancel={5: [1]}, use_cache=use_cache)
    samples = [s for step in sorted(schedule) for s in schedule[step]]
    assert 1 not in got and nfe[1] == 5
    lengths = []
    for i, (prompt, gen_len) in enumerate(samples):
        if i == 1:
            continue
        ref, ref_nfe = alone(model, prompt, gen_len, cfg)
        assert got[i] == ref and nfe[i] == ref_nfe == len(ref), f"sample {i}"
        lengths.append(len(ref))
    assert max(lengths) > 6  # some answers ran long enough to overlap the joins


@pytest.mark.parametrize("cfg", [
    DecodeConfig(mode="fast-dllm", max_new_tokens=16, block_size=4, cache="dual", threshold=0.5),
    DecodeConfig(mode="fast-dllm", max_new_tokens=16, block_size=4, cache="prefix", rule="factor", factor=2.0),
    DecodeConfig(mode="fast-dllm", max_new_tokens=16, block_size=4, cache="none", rule="topk", steps=8),
    DecodeConfig(mode="vanilla", max_new_tokens=16, block_size=4, steps=8)], ids=["dual", "prefix", "none", "vanilla"])
@pytest.mark.parametrize("name", ["tiny-llada", "tiny-dream"])
def test_block_boundary_joins_decode_as_alone(cfg, name):
    """Vanilla and Fast-dLLM: a sample sent mid-block starts at the next block boundary, aligned with the
    batch's current block; its keys past its own answer are hidden; each answer and NFE is as alone."""
    model = random_model(name, seed=5)
    schedule = {0: [(PROMPTS[0], 16), (PROMPTS[1], 16)], 1: [(PROMPTS[2] + PROMPTS[3], 16)], 5: [(PROMPTS[3], 16)]}
    got, nfe = run_with_joins(model, cfg, schedule, cancel={7: [1]})
    samples = [s for step in sorted(schedule) for s in schedule[step]]
    for i, (prompt, gen_len) in enumerate(samples):
        if i == 1 and i not in got:  # cancelled before it finished
            assert nfe[1] == 7
            continue
        ref, ref_nfe = alone(model, prompt, gen_len, cfg)
        assert [t for t in got[i] if t != model.config.mask_token_id] == ref and nfe[i] == ref_nfe, f"sample {i}"
    assert 2 in got and 3 in got


def test_cancelled_sample_leaves_and_others_are_unchanged():
    model = random_model("tiny-llada", seed=3)
    cfg = DecodeConfig(mode="d2f", max_new_tokens=24, block_size=4, tau_add=0.7, tau_act=0.9, tau_conf=0.9)
    schedule = {0: [(PROMPTS[0], 24), (PROMPTS[2], 24)], 1: [(PROMPTS[1], 24)]}
    got, nfe = run_with_joins(model, cfg, schedule, cancel={3: [1]})
    assert 1 not in got  # cancelled before it finished: never yielded
    assert nfe[1] == 3  # forwards 1-3; the cancel arrives before forward 4
    for i in (0, 2):
        prompt = schedule[0][0][0] if i == 0 else PROMPTS[1]
        assert got[i] == alone(model, prompt, 24, cfg)[0]


def test_relayout_keeps_what_a_sample_sees():
    batch = make_batch([[1, 2, 3], [4, 5]], 4, 99, 0)
    wide = batch.relayout(6, 8, 0, 99)
    assert wide.x.shape == (2, 14) and wide.prompt_len == 6
    assert wide.x[0, 3:10].tolist() == batch.x[0].tolist()
    assert wide.key_valid[1].tolist() == [False] * 4 + [True] * 10
    assert wide.position_ids[1, 4:].tolist() == list(range(10))
    assert wide.answer()[:, 4:].eq(99).all()


def test_cache_widen_moves_rows():
    from d2f.cache import KVCache
    c = KVCache(1, 1, 1, 4, 2)
    k = torch.arange(6.0).view(1, 1, 3, 2)
    c.update(0, 0, k, k)
    c.widen(2, 8, new_rows=1)
    assert c.length == 5 and c.k[0].shape == (2, 1, 8, 2)
    assert torch.equal(c.k[0][0, 0, 2:5], k[0, 0]) and c.k[0][1].abs().sum() == 0
