import pytest
import torch

from d2f import masks


def brute_block_causal(L, prompt_len, block):
    """Spelled out from the definition: prompt sees prompt; answer block k sees prompt + blocks 0..k."""
    def blk(i):
        return 0 if i < prompt_len else 1 + (i - prompt_len) // block
    return torch.tensor([[blk(k) <= blk(q) for k in range(L)] for q in range(L)])


@pytest.mark.parametrize("prompt_len,block,L", [(5, 4, 17), (8, 4, 16), (3, 7, 24), (0, 2, 6), (1, 1, 5)])
def test_block_causal_matches_definition(prompt_len, block, L):
    m = masks.dense_mask(masks.block_causal(prompt_len, block), L)
    assert m.shape == (1, 1, L, L)
    assert torch.equal(m[0, 0], brute_block_causal(L, prompt_len, block))
    # the first row sees exactly the prompt (or answer block 0 when there is no prompt)
    assert int(m[0, 0, 0].sum()) == (prompt_len if prompt_len else min(block, L))
    assert bool(m[0, 0, -1].all())  # the last answer row sees everything


@pytest.mark.parametrize("prompt_len,block,L", [(5, 4, 17), (8, 4, 16), (3, 7, 24), (0, 2, 6), (1, 1, 5)])
def test_block_end_is_where_the_block_causal_view_ends(prompt_len, block, L):
    # a block-causal row sees exactly the keys before its block's end (fewer only past the buffer's end)
    seen = brute_block_causal(L, prompt_len, block).sum(-1)  # (L,)
    end = masks.block_end(torch.arange(L), prompt_len, block)
    assert torch.equal(end.clamp(max=L), seen)
    assert int(end[-1]) == prompt_len + -(-(L - prompt_len) // block) * block  # the last block's end, past L
    # per-sample prompt lengths broadcast as in block_index
    ends = masks.block_end(torch.arange(L), torch.tensor([prompt_len, 0]), block)  # (2, L)
    assert torch.equal(ends[0], end) and torch.equal(ends[1], masks.block_end(torch.arange(L), 0, block))


def test_full_and_causal():
    assert bool(masks.dense_mask(masks.full(), 5).all())
    c = masks.dense_mask(masks.causal(), 5)[0, 0]
    assert torch.equal(c, torch.ones(5, 5, dtype=torch.bool).tril())


def test_per_sample_prompt_len_and_padding():
    prompt_len = torch.tensor([3, 5])
    key_valid = torch.tensor([[False, False, True, True, True, True, True, True, True],
                              [True] * 9])
    m = masks.dense_mask(masks.block_causal(prompt_len, 2, key_valid=key_valid), 9)
    assert m.shape == (2, 1, 9, 9)
    assert torch.equal(m[1, 0], brute_block_causal(9, 5, 2))
    expect0 = brute_block_causal(9, 3, 2) & key_valid[0][None, :]
    expect0 |= torch.eye(9, dtype=torch.bool)  # pad queries see themselves (no NaN rows)
    assert torch.equal(m[0, 0], expect0)
    assert bool(m.any(-1).all())


def test_query_window_slice_equals_rows_of_whole_mask():
    pattern = masks.block_causal(5, 4)
    whole = masks.dense_mask(pattern, 21)
    window = pattern.dense(torch.arange(9, 17), torch.arange(21))
    assert torch.equal(window, whole[:, :, 9:17])


def test_bad_patterns():
    with pytest.raises(ValueError, match="block_size > 0, got 0"):
        masks.block_causal(4, 0)
    with pytest.raises(ValueError, match="block_size > 0, got -2"):
        masks.block_causal(4, -2)
    with pytest.raises(ValueError, match="unknown attention pattern 'sliding'"):
        masks.Pattern("sliding")


def test_flex_block_mask_matches_dense():
    pytest.importorskip("torch.nn.attention.flex_attention")
    key_valid = torch.ones(2, 12, dtype=torch.bool)
    key_valid[0, :2] = False
    pattern = masks.block_causal(torch.tensor([4, 6]), 3, key_valid=key_valid)
    bm = masks.flex_block_mask(pattern, q_len=12, kv_len=12, batch=2)
    dense = masks.dense_mask(pattern, 12)
    from_flex = bm.to_dense()  # block-level (B, H, q_blocks, kv_blocks): every allowed pair sits in a kept block
    assert from_flex.shape[0] == 2 and bool(from_flex.any())
    # The mask_mod itself, evaluated elementwise, equals the dense definition.
    b, q, k = torch.meshgrid(torch.arange(2), torch.arange(12), torch.arange(12), indexing="ij")
    elem = bm.mask_mod(b, torch.zeros_like(b), q, k)
    assert torch.equal(elem, dense[:, 0])


def test_flex_block_mask_with_offsets_matches_dense_rows():
    pytest.importorskip("torch.nn.attention.flex_attention")
    pattern = masks.block_causal(5, 4)
    # queries [9, 17), keys [3, 21): a cache-less forward that starts past index 0
    bm = masks.flex_block_mask(pattern, q_len=8, kv_len=18, q_offset=9, k_offset=3)
    q, k = torch.meshgrid(torch.arange(8), torch.arange(18), indexing="ij")
    elem = bm.mask_mod(torch.zeros_like(q), torch.zeros_like(q), q, k)
    assert torch.equal(elem, masks.dense_mask(pattern, 21)[0, 0, 9:17, 3:21])
