"""The Triton block-causal kernel against the PyTorch reference: on a GPU when there is one, else
under the Triton CPU interpreter (tests/d2f_kernels/conftest.py switches it on before triton is
imported; if triton was imported earlier in this pytest process, this file re-runs itself in a
fresh process through `test_whole_file_in_fresh_process`).
"""
import math

import pytest
import torch

pytest.importorskip("triton")

from d2f import masks  # noqa: E402
from d2f.models.common import reference_attention  # noqa: E402
from d2f_kernels import block_attention  # noqa: E402
from d2f_kernels.block_attention import (block_causal_attention, block_causal_attention_reference,  # noqa: E402
                                     key_start_from_valid)
from kernel_helpers import DEVICE, fresh_process_fallback, needs_kernel  # noqa: E402

test_whole_file_in_fresh_process = fresh_process_fallback(__file__)


def make_qkv(B, H, Hkv, Tq, S, D, dtype, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g)
    k = torch.randn(B, Hkv, S, D, generator=g)
    v = torch.randn(B, Hkv, S, D, generator=g)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def left_pad_valid(key_start, length):
    """(B, length) key_valid with the first key_start[b] positions padding."""
    return torch.arange(length, device=DEVICE)[None, :] >= torch.as_tensor(key_start, device=DEVICE)[:, None]


def left_pad_valid_cpu(key_start, length):
    return torch.arange(length)[None, :] >= torch.as_tensor(key_start)[:, None]


def pattern_of(kind, prompt_len, block_size, key_valid):
    if kind == "block_causal":
        return masks.block_causal(prompt_len, block_size, key_valid)
    return masks.Pattern(kind, key_valid=key_valid)


# name: (B, H, Hkv, D, kind, prompt_len, block_size, key_start, q_offset, Tq, S, k_offset)
# Tiles are 16x16 (block_m/block_n below), so lengths like 13, 37, 45 cross tile edges unevenly.
CASES = {
    "window_with_cache": (1, 2, 2, 16, "block_causal", 13, 8, None, 21, 24, 45, 0),  # 3 blocks in flight
    "empty_cache_full_sequence": (1, 2, 2, 16, "block_causal", 13, 8, None, 0, 37, 37, 0),
    "block_larger_than_tile": (1, 2, 2, 16, "block_causal", 7, 32, None, 7, 64, 71, 0),
    "window_plus_rewritten_block": (1, 2, 2, 16, "block_causal", 20, 4, None, 24, 12, 40, 0),
    "gqa_2_to_1_odd_head_dim": (1, 4, 2, 24, "block_causal", 13, 8, None, 21, 16, 45, 0),
    "gqa_4_to_1": (1, 4, 1, 16, "block_causal", 5, 8, None, 13, 19, 37, 0),
    "batch_prompt_lens_left_pad": (2, 2, 2, 16, "block_causal", [13, 17], 8, [0, 5], 0, 41, 41, 0),
    "batch_left_pad_with_cache": (2, 4, 2, 16, "block_causal", [19, 19], 8, [6, 0], 27, 16, 51, 0),
    "prompt_only_forward": (1, 2, 2, 16, "block_causal", 30, 8, None, 0, 30, 30, 0),
    "no_cache_at_offset": (1, 2, 2, 16, "block_causal", 13, 8, None, 21, 16, 16, 21),
    "full_with_cache": (1, 2, 2, 16, "full", None, None, None, 20, 18, 45, 0),
    "full_left_pad": (2, 2, 1, 16, "full", None, None, [3, 0], 0, 33, 33, 0),
    "causal_with_cache": (1, 2, 2, 16, "causal", None, None, None, 17, 19, 36, 0),
    "causal_left_pad": (2, 2, 2, 16, "causal", None, None, [0, 9], 0, 35, 35, 0),
}


def run_case(case, dtype):
    B, H, Hkv, D, kind, prompt_len, block_size, key_start, q_offset, Tq, S, k_offset = case
    q, k, v = make_qkv(B, H, Hkv, Tq, S, D, dtype)
    prompt = torch.tensor(prompt_len, device=DEVICE) if isinstance(prompt_len, list) else prompt_len
    key_valid = left_pad_valid(key_start, k_offset + S + 8) if key_start is not None else None
    pattern = pattern_of(kind, prompt, block_size, key_valid)
    out = torch.full_like(q, float("nan"))  # poison: a row the kernel never writes fails the test
    got = block_causal_attention(q, k, v, kind=kind, prompt_len=prompt, block_size=block_size,
                                 key_start=torch.tensor(key_start, device=DEVICE) if key_start is not None else None,
                                 q_offset=q_offset, k_offset=k_offset, out=out, block_m=16, block_n=16)
    # the reference in fp32 on the same (rounded) inputs
    want = block_causal_attention_reference(q.float(), k.float(), v.float(), pattern, q_offset, k_offset)
    return got, want


@needs_kernel
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference_fp32(name):
    got, want = run_case(CASES[name], torch.float32)
    assert got.data_ptr() != 0 and not got.isnan().any()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 1.6e-2), (torch.float16, 4e-3)])
@pytest.mark.parametrize("name", ["window_with_cache", "batch_left_pad_with_cache", "causal_left_pad"])
def test_kernel_matches_reference_half(name, dtype, atol):
    got, want = run_case(CASES[name], dtype)
    assert got.dtype == dtype and not got.isnan().any()
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=0)


@needs_kernel
def test_invisible_keys_are_never_read():
    """Keys past the last block any query of the tile may see are skipped, not just masked.

    Poison them with NaN: if the kernel loaded them, 0 * NaN would reach the output.
    """
    P, bs, q_offset, Tq = 13, 8, 21, 8  # one query tile: block 1 of the answer
    S = 61
    q, k, v = make_qkv(1, 2, 2, Tq, S, 16, torch.float32)
    pattern = masks.block_causal(P, bs)
    want = block_causal_attention_reference(q, k, v, pattern, q_offset)
    first_invisible = P + 2 * bs  # block 1 ends here
    k[:, :, first_invisible:] = float("nan")
    v[:, :, first_invisible:] = float("nan")
    got = block_causal_attention(q, k, v, kind="block_causal", prompt_len=P, block_size=bs, q_offset=q_offset,
                                 block_m=16, block_n=16)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@needs_kernel
def test_non_contiguous_inputs():
    """q/k/v as views of (B, T, H, D) projections (the layout before .transpose(1, 2))."""
    B, H, T, D = 1, 2, 29, 16
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(B, T, 3, H, D, generator=g).to(DEVICE)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, T, D), strided
    got = block_causal_attention(q, k, v, kind="block_causal", prompt_len=9, block_size=4)
    want = block_causal_attention_reference(q, k, v, masks.block_causal(9, 4))  # strided inputs too
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    contiguous = block_causal_attention_reference(q.contiguous(), k.contiguous(), v.contiguous(),
                                                  masks.block_causal(9, 4))
    torch.testing.assert_close(want, contiguous)


@pytest.mark.parametrize("kind", ["full", "causal", "block_causal"])
def test_reference_matches_common_reference_attention(kind):
    """The reference is `Pattern.dense` + softmax: same as the models' naive reference (GQA too)."""
    B, H, Hkv, Tq, S, D, q_offset = 2, 6, 2, 11, 30, 8, 19
    q, k, v = make_qkv(B, H, Hkv, Tq, S, D, torch.float32, seed=3)
    key_valid = left_pad_valid([4, 0], 40)
    pattern = pattern_of(kind, torch.tensor([12, 15]), 5, key_valid)
    mask = pattern.dense(torch.arange(q_offset, q_offset + Tq), torch.arange(S))
    torch.testing.assert_close(block_causal_attention_reference(q, k, v, pattern, q_offset),
                               reference_attention(q, k, v, mask), atol=1e-6, rtol=1e-6)
    # mask None = full attention
    torch.testing.assert_close(block_causal_attention_reference(q, k, v, None, q_offset),
                               reference_attention(q, k, v, None), atol=1e-6, rtol=1e-6)


def test_key_start_from_valid():
    kv = left_pad_valid([0, 3, 7], 12)
    assert key_start_from_valid(kv, 10).tolist() == [0, 3, 7]
    right_pad = torch.ones(2, 12, dtype=torch.bool)
    right_pad[1, 9:] = False
    assert key_start_from_valid(right_pad, 12) is None  # padding not a prefix
    assert key_start_from_valid(right_pad, 9).tolist() == [0, 0]  # only the keys in use matter
    with pytest.raises(ValueError, match="covers 12 positions"):
        key_start_from_valid(kv, 13)


@needs_kernel
def test_bad_inputs_raise_clear_errors(monkeypatch):
    q, k, v = make_qkv(1, 3, 2, 4, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="not a multiple"):
        block_causal_attention(q, k, v, kind="full")
    q, k, v = make_qkv(1, 2, 2, 4, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="unknown attention kind 'diag'"):
        block_causal_attention(q, k, v, kind="diag")
    with pytest.raises(ValueError, match=r"queries \[6, 10\) must lie inside keys \[0, 8\)"):
        block_causal_attention(q, k, v, kind="full", q_offset=6)
    with pytest.raises(ValueError, match="block_causal needs prompt_len"):
        block_causal_attention(q, k, v, kind="block_causal", prompt_len=3)
    with pytest.raises(ValueError, match="prompt_len must be an int or a"):
        block_causal_attention(q, k, v, kind="block_causal", prompt_len=torch.tensor([1, 2]), block_size=2)
    with pytest.raises(ValueError, match="share one of"):
        block_causal_attention(q.double(), k.double(), v.double(), kind="full")
    with pytest.raises(ValueError, match="block_m must be a power of two >= 16"):
        block_causal_attention(q, k, v, kind="full", block_m=8)


@pytest.mark.parametrize("env,reason", [("1", "TRITON_INTERPRET=1 was set after triton was first imported"),
                                        (None, "needs a CUDA device, or the Triton CPU interpreter")])
def test_cpu_without_kernel_falls_back_to_the_reference(monkeypatch, env, reason):
    """No interpreter on a CPU: warn once, saying why and what to do, and compute the reference."""
    monkeypatch.setattr(block_attention, "interpreted", lambda: False)
    monkeypatch.setattr(block_attention, "_warned", set())
    if env is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", env)
    q, k, v = make_qkv(2, 4, 2, 9, 30, 16, torch.float32, device="cpu")
    out = torch.full_like(q, float("nan"))
    with pytest.warns(RuntimeWarning, match=reason):
        got = block_causal_attention(q, k, v, kind="block_causal", prompt_len=torch.tensor([10, 12]), block_size=4,
                                     key_start=torch.tensor([3, 0]), q_offset=21, out=out)
    pattern = masks.block_causal(torch.tensor([10, 12]), 4, left_pad_valid_cpu([3, 0], 30))
    assert got is out
    torch.testing.assert_close(got, block_causal_attention_reference(q, k, v, pattern, 21))


@needs_kernel
def test_softmax_scale_is_one_over_sqrt_head_dim():
    """Identical keys except one: the weights must follow exp(q.k / sqrt(D))."""
    D = 16
    q = torch.zeros(1, 1, 1, D, device=DEVICE)
    q[..., 0] = 2.0
    k = torch.zeros(1, 1, 2, D, device=DEVICE)
    k[0, 0, 1, 0] = 1.0  # score 2 for key 1, 0 for key 0
    v = torch.zeros(1, 1, 2, D, device=DEVICE)
    v[0, 0, 1, 0] = 1.0  # output[0] = weight of key 1
    got = block_causal_attention(q, k, v, kind="full", q_offset=1)
    w = math.exp(2 / math.sqrt(D)) / (1 + math.exp(2 / math.sqrt(D)))
    assert abs(got[0, 0, 0, 0].item() - w) < 1e-6
