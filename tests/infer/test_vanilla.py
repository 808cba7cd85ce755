"""Vanilla decoding == a straightforward re-implementation of LLaDA's published algorithm."""
import pytest
import torch

from helpers import random_model
from infer.api import DecodeConfig, generate
from infer.sampling import NEG_INF


def llada_reference(model, prompt: list[int], gen_len: int, block_len: int, steps: int):
    """LLaDA `generate` (low_confidence remasking, temperature 0, no CFG), written plainly.
    Returns the answer and, per step, the sorted committed answer positions."""
    mask_id = model.config.mask_token_id
    x = torch.tensor([prompt + [mask_id] * gen_len])
    P = len(prompt)
    n_blocks = gen_len // block_len
    steps_per_block = steps // n_blocks
    commits = []
    for b in range(n_blocks):
        s, e = P + b * block_len, P + (b + 1) * block_len
        n_masked = int((x[0, s:e] == mask_id).sum())
        counts = [n_masked // steps_per_block] * steps_per_block
        for i in range(n_masked % steps_per_block):
            counts[i] += 1
        for k in counts:
            logits = model(x).double()[..., :model.config.vocab_size]
            if model.config.logits_shift:
                logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
            logits[..., mask_id] = NEG_INF  # we never commit the mask token itself
            p = torch.softmax(logits, -1)
            x0 = p.argmax(-1)
            conf = p.gather(-1, x0[..., None])[..., 0]
            conf[:, e:] = NEG_INF
            conf[:, :s] = NEG_INF
            conf[x != mask_id] = NEG_INF
            idx = torch.topk(conf[0], k).indices
            x[0, idx] = x0[0, idx]
            commits.append(sorted((idx - P).tolist()))
    return x[0, P:].tolist(), commits


@pytest.mark.parametrize("name,gen,block,steps", [
    ("tiny-llada", 16, 8, 8),     # 4 per step... 2 per step per block
    ("tiny-llada", 12, 4, 9),     # 3 blocks x 3 steps: counts 2,1,1 (remainder on the first step)
    ("tiny-dream", 16, 8, 6),     # 3 steps per block: counts 3,3,2; Dream's shifted logits
    ("tiny-llada-gqa", 10, 10, 4),  # one block, counts 3,3,2,2
])
def test_vanilla_matches_reference(name, gen, block, steps):
    model = random_model(name, seed=1)
    prompt = [5, 9, 17, 3, 44]
    ref, ref_commits = llada_reference(model, prompt, gen, block, steps)
    cfg = DecodeConfig(mode="vanilla", max_new_tokens=gen, block_size=block, steps=steps)
    [res] = generate(model, None, [prompt], cfg, trace=True)
    assert res.nfe == steps
    assert [r["committed"] for r in res.trace] == ref_commits
    # block order: every step commits only inside its own block
    for r in res.trace:
        assert all(r["block"] * block <= p < (r["block"] + 1) * block for p in r["committed"])
    eos = model.config.eos_token_id
    full = ref[: ref.index(eos) + 1] if eos in ref else ref
    assert res.token_ids == full


def test_vanilla_temperature_is_seeded():
    model = random_model("tiny-llada", seed=2, std=0.2)
    cfg = DecodeConfig(mode="vanilla", max_new_tokens=16, block_size=8, steps=16, temperature=1.0, seed=7)
    a = generate(model, None, [[4, 5, 6]], cfg)[0].token_ids
    b = generate(model, None, [[4, 5, 6]], cfg)[0].token_ids
    g = generate(model, None, [[4, 5, 6]], DecodeConfig(mode="vanilla", max_new_tokens=16, block_size=8,
                                                        steps=16))[0].token_ids
    assert a == b and a != g
