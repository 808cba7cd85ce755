"""The one definition of the attention patterns used everywhere (docs/design.md §2).

Every backend (dense SDPA masks, flex-attention block masks, the Triton kernel in
`d2f_kernels/`) is derived from `block_index` / `allowed` below and tested against them.

Indices here are *buffer indices*: the column of a token in the (B, L) sequence
buffer the decoder or trainer works on. Batches with prompts of different lengths are
left-padded, so every sample's answer starts at the same index `prompt_len` and block k
of the answer occupies [prompt_len + k*B, prompt_len + (k+1)*B) for every sample; the
padding is removed from the keys by `key_valid`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

KINDS = ("full", "causal", "block_causal")


def _per_row(prompt_len: Tensor | int) -> Tensor | int:
    """A (B,) tensor of prompt lengths as (B, 1), so it broadcasts over positions; an int as it is."""
    if isinstance(prompt_len, Tensor) and prompt_len.dim() == 1:
        return prompt_len[:, None]  # (B, 1)
    return prompt_len


def block_index(idx: Tensor, prompt_len: Tensor | int, block_size: int) -> Tensor:
    """Block number of each index: 0 for the prompt, k + 1 for answer block k.

    `prompt_len` is an int or a (B,) tensor (then `idx` broadcasts to (B, L)).
    """
    prompt_len = _per_row(prompt_len)
    answer_block = torch.div(idx - prompt_len, block_size, rounding_mode="floor") + 1
    return torch.where(idx < prompt_len, torch.zeros_like(answer_block), answer_block)


def block_end(idx: Tensor, prompt_len: Tensor | int, block_size: int) -> Tensor:
    """One past the last index of the block holding each index (`prompt_len` for the prompt): where a
    block-causal model's view from that index ends. Shapes as `block_index`."""
    prompt_len = _per_row(prompt_len)
    return prompt_len + block_index(idx, prompt_len, block_size) * block_size


def allowed(kind: str, q_idx: Tensor, k_idx: Tensor, prompt_len: Tensor | int | None = None,
            block_size: int | None = None) -> Tensor:
    """May query index q attend to key index k? Returns bool (..., Tq, Tk).

    full: always. causal: k <= q. block_causal: block(k) <= block(q), i.e. prompt tokens see
    the prompt only and answer block k sees the prompt and blocks 0..k (bidirectional inside
    its own block, nothing after it).
    """
    if kind == "full":
        return torch.ones(q_idx.shape[-1], k_idx.shape[-1], dtype=torch.bool, device=q_idx.device)
    if kind == "causal":
        return k_idx[None, :] <= q_idx[:, None]
    if kind == "block_causal":
        qb = block_index(q_idx, prompt_len, block_size)  # (Tq,) or (B, Tq)
        kb = block_index(k_idx, prompt_len, block_size)  # (Tk,) or (B, Tk)
        return kb[..., None, :] <= qb[..., :, None]
    raise ValueError(f"unknown attention pattern {kind!r}; expected one of {KINDS}")


@dataclass(frozen=True)
class Pattern:
    """An attention pattern, turned into whatever a backend needs (dense mask, block mask...).

    kind: "full" | "causal" | "block_causal".
    prompt_len: buffer index where answer block 0 starts (int, or (B,) tensor); block_causal only.
    block_size: answer block size; block_causal only.
    key_valid: optional (B, L) bool, False at padding; L may exceed the key length of a call
        (it is sliced), so one tensor can serve a whole decode.
    """

    kind: str = "full"
    prompt_len: Tensor | int | None = None
    block_size: int | None = None
    key_valid: Tensor | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown attention pattern {self.kind!r}; expected one of {KINDS}")
        if self.kind == "block_causal":
            if self.block_size is None or int(self.block_size) <= 0:
                raise ValueError(f"block_causal needs block_size > 0, got {self.block_size!r}")
            if self.prompt_len is None:
                raise ValueError("block_causal needs prompt_len (index where answer block 0 starts)")

    def dense(self, q_idx: Tensor, k_idx: Tensor) -> Tensor:
        """Boolean SDPA mask (B or 1, 1, Tq, Tk); True = may attend. q_idx is (Tq,), or (B, Tq) when
        each sample's queries sit at their own buffer indices (`infer.batch.forward_rows`)."""
        mask = allowed(self.kind, q_idx, k_idx, self.prompt_len, self.block_size)
        mask = mask if mask.dim() == 3 else mask[None]  # (B|1, Tq, Tk)
        if self.key_valid is not None:
            kv = self.key_valid[:, k_idx]  # (B, Tk)
            mask = mask & kv[:, None, :]
            # A padding query would see nothing (a NaN row in softmax): let every query see
            # itself. Pad rows are never read, real rows are unaffected.
            mask = mask | (q_idx[..., :, None] == k_idx[None, :])
        return mask[:, None]  # (B|1, 1, Tq, Tk)


def full(key_valid: Tensor | None = None) -> Pattern:
    return Pattern("full", key_valid=key_valid)


def causal(key_valid: Tensor | None = None) -> Pattern:
    return Pattern("causal", key_valid=key_valid)


def block_causal(prompt_len: Tensor | int, block_size: int, key_valid: Tensor | None = None) -> Pattern:
    return Pattern("block_causal", prompt_len=prompt_len, block_size=block_size, key_valid=key_valid)


def dense_mask(pattern: Pattern, seq_len: int, device=None) -> Tensor:
    """The whole-sequence mask (B|1, 1, L, L) of a pattern: the reference every backend meets."""
    idx = torch.arange(seq_len, device=device)
    return pattern.dense(idx, idx)


def flex_block_mask(pattern: Pattern, q_len: int, kv_len: int, q_offset: int = 0, batch: int | None = None,
                    k_offset: int = 0, device=None):
    """A flex-attention BlockMask for `pattern` (torch >= 2.5): queries at buffer indices
    [q_offset, q_offset+q_len), keys at [k_offset, k_offset+kv_len), built on `device`
    (default: where `key_valid` lives, else the CPU)."""
    from torch.nn.attention.flex_attention import create_block_mask

    prompt_len, block_size, key_valid = pattern.prompt_len, pattern.block_size, pattern.key_valid
    per_sample = isinstance(prompt_len, Tensor) and prompt_len.dim() == 1

    def mask_mod(b, h, q, k):
        qi, ki = q + q_offset, k + k_offset
        if pattern.kind == "full":
            ok = qi >= 0
        elif pattern.kind == "causal":
            ok = ki <= qi
        else:
            p = prompt_len[b] if per_sample else prompt_len
            qb = torch.where(qi < p, 0, (qi - p) // block_size + 1)
            kb = torch.where(ki < p, 0, (ki - p) // block_size + 1)
            ok = kb <= qb
        if key_valid is not None:
            ok = ok & (key_valid[b, ki] | (ki == qi))
        return ok

    if device is None:
        device = key_valid.device if key_valid is not None else "cpu"
    return create_block_mask(mask_mod, B=batch, H=None, Q_LEN=q_len, KV_LEN=kv_len, device=device)
