"""The D2F noise schedule: per-block ratios, prompt untouched, empirical rates match."""
import pytest
import torch

from d2f.masks import block_index
from d2f.noise import add_block_noise, block_ratios, num_answer_blocks

MASK = 99


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_monotone_ratios_are_non_decreasing_and_in_range():
    r = block_ratios(2000, 12, _gen(), "monotone")
    assert r.shape == (2000, 12)
    assert (r[:, 1:] >= r[:, :-1]).all()
    assert r.min() >= 0.2 and r.max() <= 0.7
    # p0 ~ U[0.2, 0.7): mean 0.45; the last block's ratio approaches 0.7 on average
    assert abs(r[:, 0].mean().item() - 0.45) < 0.02
    assert r[:, 0].min() < 0.22 and r[:, 0].max() > 0.68
    # each increment is < (0.7 - p0) / (N - 1)
    inc = r[:, 1:] - r[:, :-1]
    assert (inc <= (0.7 - r[:, :1]) / 11 + 1e-6).all()


def test_single_block_and_random_schedule():
    assert block_ratios(5, 1, _gen()).shape == (5, 1)
    r = block_ratios(4000, 8, _gen(), "random")
    assert r.min() >= 0.2 and r.max() < 0.7
    # random ratios are not ordered: many rows decrease somewhere
    assert ((r[:, 1:] < r[:, :-1]).any(dim=1).float().mean() > 0.9)
    with pytest.raises(ValueError, match="unknown noise schedule 'linear'"):
        block_ratios(2, 3, _gen(), "linear")
    with pytest.raises(ValueError, match="p_min"):
        block_ratios(2, 3, _gen(), "monotone", p_min=0.8, p_max=0.7)


def test_prompt_never_masked_and_ratio_is_per_block():
    B, L, bs = 64, 40, 8
    ids = torch.randint(0, 90, (B, L))
    plen = torch.randint(1, 12, (B,))
    out = add_block_noise(ids, plen, bs, MASK, _gen(3))
    pos = torch.arange(L)
    prompt = pos[None] < plen[:, None]
    assert not out.masked[prompt].any()
    assert (out.ratio[prompt] == 0).all()
    assert torch.equal(out.noisy_ids[prompt], ids[prompt])
    assert (out.noisy_ids[out.masked] == MASK).all()
    assert torch.equal(out.noisy_ids[~out.masked], ids[~out.masked])
    blk = block_index(pos, plen, bs)
    for b in range(B):
        n = int(num_answer_blocks(L, plen[b:b + 1], bs))
        per_block = [out.ratio[b][blk[b] == k + 1] for k in range(n)]
        # one ratio per block, constant inside it, non-decreasing along the answer
        assert all((v == v[0]).all() for v in per_block)
        firsts = torch.stack([v[0] for v in per_block])
        assert (firsts[1:] >= firsts[:-1]).all()
        assert firsts.min() >= 0.2 and firsts.max() <= 0.7


def test_empirical_mask_rates_match_the_drawn_ratios():
    # long blocks so each block's empirical rate is a good estimate of its ratio
    B, P, bs, nblk = 16, 5, 2000, 4
    ids = torch.randint(0, 90, (B, P + bs * nblk))
    out = add_block_noise(ids, P, bs, MASK, _gen(7))
    m = out.masked[:, P:].view(B, nblk, bs).float().mean(-1)  # (B, nblk) empirical rates
    r = out.ratio[:, P:].view(B, nblk, bs)[..., 0]  # drawn ratios
    # binomial std at n=2000 is <= 0.0112; 5 sigma
    assert (m - r).abs().max() < 0.056
    assert abs((m - r).mean().item()) < 0.005


def test_seeded_generator_reproduces_noise_and_partial_last_block():
    ids = torch.randint(0, 90, (3, 23))
    a = add_block_noise(ids, torch.tensor([3, 4, 5]), 8, MASK, _gen(11))
    b = add_block_noise(ids, torch.tensor([3, 4, 5]), 8, MASK, _gen(11))
    assert torch.equal(a.masked, b.masked) and torch.equal(a.ratio, b.ratio)
    # sample 0: answer = 20 tokens -> blocks of 8, 8, 4; the partial block has its own ratio
    assert (a.ratio[0, 19:] == a.ratio[0, 19]).all() and a.ratio[0, 19] >= a.ratio[0, 11]
    c = add_block_noise(ids, torch.tensor([3, 4, 5]), 8, MASK, _gen(12))
    assert not torch.equal(a.ratio, c.ratio)
