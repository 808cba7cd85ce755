"""Attention backends for the models, swapped from outside:

    set_backend(model, "triton")   # or "sdpa", "flex", "reference", "auto"

A backend has the interface `d2f/models/base.py` calls, with the forward's `AttnContext`:

    ctx.prepared = backend.prepare(ctx)   # once per forward (in AttnContext.__post_init__)
    y = backend(q, k, v, ctx)   # per layer; q (B, H, T, D), k, v (B, Hkv, S, D) -> (B, H, T, D)

`prepare` reads ctx.mask, ctx.offset (of the first query), ctx.q_len, ctx.k_offset, ctx.kv_len and
ctx.device, and returns the mask in the backend's own form; `__call__` reads it back as ctx.prepared.
`ctx.mask` is None (full attention; base.py already turned None into `masks.causal()` for causal
models), a `d2f.masks.Pattern`, or an explicit boolean tensor (B|1, 1|H, T, S). To call a backend
alone: `AttnContext(mask, q_offset, q_len, k_offset, kv_len, device, backend).attend(q, k, v)`.

- sdpa: torch SDPA with a dense boolean mask (`d2f.models.common.SDPABackend`, the default).
- flex: torch flex attention with `d2f.masks.flex_block_mask` (compiled on CUDA, eager elsewhere).
- triton: the block-causal kernel of `d2f_kernels/block_attention.py`; on a CPU it runs under the
  Triton interpreter (TRITON_INTERPRET=1 set before triton is first imported), else it warns once
  and uses the PyTorch reference (slow, correct). It is forward-only, so whenever
  autograd needs gradients, and for inputs it does not cover (explicit tensor masks, padding that
  is not a left prefix, float64), it falls back to SDPA with the dense mask of the same pattern.
- reference: `block_causal_attention_reference` (naive fp32 PyTorch); slow, for tests.
- auto: triton on CUDA, sdpa elsewhere.

Which backend for training? The D2F student trains on whole sequences under the block-causal
pattern, which needs a backward pass. The Triton kernel here has none, so training stays on SDPA
(one dense (B|1, 1, L, L) boolean mask shared by all layers; works on every device and torch
version) or flex (compiled on CUDA, skips masked tiles in forward *and* backward). Training was not
measured on a GPU, so the training default stays SDPA and flex is opt-in.
`d2f_kernels/bench_block_attention.py` measures the forward of all three alone, and `python -m infer.bench`
inside the decode loop (docs/bench.md: on an H200, flex recompiled on every new window and batch size
until dynamo's recompile limit, then ran unfused).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from d2f.masks import Pattern, flex_block_mask
from d2f.models.base import AttnContext, DiffusionLM
from d2f.models.common import SDPABackend, reference_attention, sdpa
from d2f_kernels.block_attention import (KERNEL_DTYPES, block_causal_attention, block_causal_attention_reference,
                                     kernel_available, key_start_from_valid, per_sample)


@dataclass
class _Fallback:
    """What the triton/flex backends hand to SDPA when they cannot serve a forward."""
    mask: Tensor | None  # the SDPA mask


def _sdpa_fallback(ctx: AttnContext) -> _Fallback:
    return _Fallback(SDPABackend().prepare(ctx))


def _kernel_cannot_take(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """The kernel is forward-only and fp16/bf16/fp32 only (fp64 test models go to SDPA)."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return needs_grad or q.dtype not in KERNEL_DTYPES


# ---- triton ----------------------------------------------------------------------------------
@dataclass
class _TritonArgs:
    """The kernel's view of one forward: pattern as a few integers per sample."""
    kind: str
    prompt_len: Tensor | int | None
    block_size: int | None
    key_start: Tensor | None
    q_offset: int
    k_offset: int
    fallback: _Fallback | None = None  # the same pattern as an SDPA mask, built when first needed


class TritonBackend:
    name = "triton"

    def prepare(self, ctx: AttnContext) -> _TritonArgs | _Fallback:
        mask, device = ctx.mask, ctx.device
        if isinstance(mask, Tensor):  # an arbitrary dense mask: nothing for the kernel to exploit
            return _sdpa_fallback(ctx)
        pattern = mask if mask is not None else Pattern("full")
        key_start = None
        if pattern.key_valid is not None:
            key_start = key_start_from_valid(pattern.key_valid.to(device), ctx.k_offset + ctx.kv_len)
            if key_start is None:  # padding that is not a left prefix: the kernel cannot express it
                return _sdpa_fallback(ctx)
        prompt_len = pattern.prompt_len
        if isinstance(prompt_len, Tensor):
            prompt_len = prompt_len.to(device)
        return _TritonArgs(pattern.kind, prompt_len, pattern.block_size, key_start, ctx.offset, ctx.k_offset)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext) -> Tensor:
        prepared = ctx.prepared
        if isinstance(prepared, _TritonArgs) and _kernel_cannot_take(q, k, v):
            if prepared.fallback is None:  # first layer of such a forward: build the mask once
                prepared.fallback = _sdpa_fallback(ctx)
            prepared = prepared.fallback
        if isinstance(prepared, _Fallback):
            return sdpa(q, k, v, prepared.mask)
        if not isinstance(prepared.prompt_len, Tensor) or prepared.key_start is None:
            # first layer: make the per-sample (B,) int32 arguments once, not in every layer
            B = q.shape[0]
            prepared.prompt_len = per_sample(prepared.prompt_len if prepared.prompt_len is not None else 0,
                                             B, q.device, "prompt_len")
            prepared.key_start = per_sample(prepared.key_start if prepared.key_start is not None else 0,
                                            B, q.device, "key_start")
        return block_causal_attention(q, k, v, kind=prepared.kind, prompt_len=prepared.prompt_len,
                                      block_size=prepared.block_size, key_start=prepared.key_start,
                                      q_offset=prepared.q_offset, k_offset=prepared.k_offset)


# ---- flex ------------------------------------------------------------------------------------
_compiled_flex = None


def _flex_attention():
    """flex_attention, and its compiled version for CUDA (eager flex materialises dense scores).

    Decoding changes the key length every step; default (automatic) dynamic shapes recompile once
    with symbolic lengths instead of once per length, which would soon hit dynamo's recompile limit.
    """
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex, flex_attention


class FlexBackend:
    name = "flex"

    def prepare(self, ctx: AttnContext):
        mask, device = ctx.mask, ctx.device
        # An explicit tensor mask has no mask_mod: SDPA serves it.
        if isinstance(mask, Tensor):
            return _sdpa_fallback(ctx)
        pattern = mask if mask is not None else Pattern("full")
        # Tensors the mask_mod reads must live where the block mask is built and used.
        if isinstance(pattern.prompt_len, Tensor):
            pattern = replace(pattern, prompt_len=pattern.prompt_len.to(device))
        if pattern.key_valid is not None:
            pattern = replace(pattern, key_valid=pattern.key_valid.to(device))
        batch = None  # one mask for the whole batch unless the pattern differs per sample
        if pattern.key_valid is not None:
            batch = pattern.key_valid.shape[0]
        elif isinstance(pattern.prompt_len, Tensor) and pattern.prompt_len.dim() == 1:
            batch = pattern.prompt_len.shape[0]
        return flex_block_mask(pattern, ctx.q_len, ctx.kv_len, q_offset=ctx.offset, batch=batch,
                               k_offset=ctx.k_offset, device=device)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext) -> Tensor:
        if isinstance(ctx.prepared, _Fallback):
            return sdpa(q, k, v, ctx.prepared.mask)
        compiled, eager = _flex_attention()
        fn = compiled if q.is_cuda else eager
        return fn(q, k, v, block_mask=ctx.prepared, enable_gqa=q.shape[1] != k.shape[1])


# ---- reference -------------------------------------------------------------------------------
class ReferenceBackend:
    name = "reference"

    def prepare(self, ctx: AttnContext) -> None:
        return None  # the reference reads ctx.mask and the offsets itself, in every layer

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext) -> Tensor:
        if isinstance(ctx.mask, Tensor):
            return reference_attention(q, k, v, ctx.mask)
        return block_causal_attention_reference(q, k, v, ctx.mask, q_offset=ctx.offset, k_offset=ctx.k_offset)


# ---- choosing one ----------------------------------------------------------------------------
BACKENDS = {"sdpa": SDPABackend, "flex": FlexBackend, "triton": TritonBackend, "reference": ReferenceBackend}


def get_backend(name: str, device=None):
    """A backend instance by name; "auto" = triton on CUDA, sdpa elsewhere."""
    if name == "auto":
        on_cuda = device is not None and torch.device(device).type == "cuda"
        name = "triton" if on_cuda and kernel_available(device) else "sdpa"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {[*BACKENDS, 'auto']}")
    return BACKENDS[name]()


def set_backend(model, backend="auto"):
    """Make every d2f model inside `model` (itself, or wrapped by PEFT/DDP) use `backend`.

    backend: a name (see BACKENDS, or "auto") or an object with prepare(ctx) / __call__(q, k, v, ctx).
    Returns model.
    """
    if isinstance(backend, str):
        device = next(model.parameters()).device
        backend = get_backend(backend, device)
    # isinstance, not hasattr: PEFT wrappers forward attribute reads to the model they wrap
    targets = [m for m in model.modules() if isinstance(m, DiffusionLM)]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no attention backend to set (not a d2f model?)")
    for m in targets:
        m.attn_backend = backend
    return model
