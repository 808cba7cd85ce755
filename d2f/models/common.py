"""Pieces shared by the LLaDA and Dream architectures: RMSNorm, RoPE, attention backends.

The math lives in free functions; each architecture's modules keep the parameter names of
its public checkpoints and call these.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2f.masks import Pattern

if TYPE_CHECKING:
    from d2f.models.base import AttnContext


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 (bf16 mean-of-squares loses precision at d_model 4096), cast back,
        # then scale: the order both public LLaDA and Dream implementations use.
        xf = x if x.dtype == torch.float64 else x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(position_ids: Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (B, 1, T, D) for rotate-half (GPT-NeoX / Llama) RoPE.

    Computed in fp32 (as LLaDA's `rope_full_precision`), or fp64 for fp64 models (tests)."""
    dtype = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device,
                                             dtype=dtype) / head_dim))
    freqs = position_ids.to(dtype)[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, D)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, D); rotate pairs (i, i + D/2)."""
    xf = x.to(cos.dtype)
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class SDPABackend:
    """Default attention: torch SDPA with a dense boolean mask built once per forward.

    The backend interface (`d2f_kernels/backends.py`): `prepare(ctx)` once per forward, its result kept
    as `ctx.prepared`; then `backend(q, k, v, ctx)` in every layer."""

    name = "sdpa"

    def prepare(self, ctx: AttnContext) -> Tensor | None:
        """Queries sit at buffer indices [ctx.offset, +q_len), keys at [ctx.k_offset, +kv_len)."""
        mask = ctx.mask
        if mask is None:
            return None
        if isinstance(mask, Pattern):
            if mask.kind == "full" and mask.key_valid is None:
                return None
            # offsets are ints, or 0-dim device tensors under static shapes (d2f.cache.StaticKVCache)
            q_idx = torch.arange(ctx.q_len, device=ctx.device) + ctx.offset
            k_idx = torch.arange(ctx.kv_len, device=ctx.device) + ctx.k_offset
            return mask.dense(q_idx, k_idx)
        return mask  # an explicit (B|1, 1|H, Tq, Tk) tensor

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext) -> Tensor:
        return sdpa(q, k, v, ctx.prepared)


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """q (B, H, T, D); k, v (B, H_kv, S, D); mask None or bool (B|1, 1|H, T, S) -> (B, H, T, D)."""
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def reference_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Naive einsum attention in fp32 (the slow reference the tests compare against)."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1).float()
    v = v.repeat_interleave(rep, dim=1).float()
    scores = torch.einsum("bhtd,bhsd->bhts", q.float(), k) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhts,bhsd->bhtd", scores.softmax(-1), v).to(q.dtype)


def shift_logits(logits: Tensor) -> Tensor:
    """Dream's logit shift: position i's prediction comes from row i-1; row 0 reuses its own.

    The one place the shift is defined. A decoder that forwards a window starting at
    buffer index s must include index s-1 to predict index s.
    """
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
