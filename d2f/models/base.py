"""The forward shared by both architectures: embed -> blocks -> norm -> head.

    logits = model(input_ids, position_ids=None, mask=None, cache=None, offset=0)

- input_ids (B, T) sit at buffer indices [offset, offset + T); offset is an int, or a 0-dim device
  tensor with a `d2f.cache.StaticKVCache` (static shapes for CUDA graphs, `infer.graphs`).
- position_ids (B, T) feed RoPE; default offset + arange(T). Left-padded batches pass
  per-sample positions so that every sample sees the same relative positions as alone.
- mask: None (full attention, or causal for an `is_causal` model), a `d2f.masks.Pattern`
  (full / causal / block_causal, with optional key padding), or an explicit boolean tensor
  (B|1, 1|H, T, S) for anything else.
- cache: a `d2f.cache.KVCache`; keys are then every cached row [0, length) plus this call's.

Inside, the forward builds one `AttnContext` (RoPE tables, mask, cache, offsets, backend) and every
layer is called as `layer(x, ctx)`, like gpt-fast's `layer(x, input_pos, freqs_cis, mask)`.

How attention is computed is the backend's business (`model.attn_backend`, SDPA by default);
it is swapped from outside (`d2f_kernels.set_backend`), like LoRA and torch.compile.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from d2f.cache import KVCache
from d2f.masks import Pattern, causal
from d2f.models.common import SDPABackend, apply_rope, rope_cos_sin
from d2f.models.config import ModelConfig


@dataclass(eq=False)
class AttnContext:
    """What every layer's attention reads from one forward; `DiffusionLM.forward` builds one per call.

    Why one object: the per-forward inputs (RoPE tables, mask, cache, offsets, backend and its
    prepared mask) would otherwise be a dozen positional arguments that every layer only passes on
    to attention. With it a layer is `layer(x, ctx)`, as gpt-fast's are `layer(x, input_pos,
    freqs_cis, mask)`, and the attention backends, swapped in from outside, take the same object:
    something new a forward needs becomes a field here, not a new argument through every layer.

    Queries are this call's q_len rows at buffer indices [offset, offset + q_len); keys are kv_len
    rows at [k_offset, k_offset + kv_len): the cache's rows from 0 with a cache, else the queries'.
    """

    mask: Pattern | Tensor | None  # None: full; a masks.Pattern; or an explicit bool (B|1, 1|H, T, S)
    offset: int | Tensor  # buffer index of the first query; a 0-dim device tensor with a StaticKVCache
    q_len: int  # T
    k_offset: int | Tensor  # buffer index of the first key: 0 with a cache, else `offset`
    kv_len: int  # S
    device: torch.device | str
    backend: Any = field(default_factory=SDPABackend)  # has prepare(ctx) and __call__(q, k, v, ctx)
    cos: Tensor | None = None  # (B, 1, T, D) RoPE of this call's rows
    sin: Tensor | None = None  # (B, 1, T, D)
    cache: KVCache | None = None
    prepared: Any = field(init=False, default=None)  # the mask in the backend's own form, made once

    def __post_init__(self):
        self.prepared = self.backend.prepare(self)

    def rope(self, x: Tensor) -> Tensor:
        return apply_rope(x, self.cos, self.sin)  # (B, H, T, D)

    def keys_values(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """This call's k, v (B, Hkv, T, D) -> what the queries attend to, (B, Hkv, S, D): themselves, or,
        with a cache, written into that layer's rows [offset, offset + T) and every cached row returned."""
        if self.cache is None:
            return k, v
        return self.cache.update(layer_idx, self.offset, k, v)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.backend(q, k, v, self)  # (B, H, T, D)


def self_attention(x: Tensor, ctx: AttnContext, layer_idx: int, q_proj: nn.Linear, k_proj: nn.Linear,
                   v_proj: nn.Linear, o_proj: nn.Linear) -> Tensor:
    """x (B, T, C) -> (B, T, C). `ctx` is the forward's; the cache slot `layer_idx` and the projections are
    the layer's own, passed one by one because each architecture keeps its checkpoint's module names
    (LLaDA's sit on the block itself, its output projection is `attn_out`)."""
    B, T, _ = x.shape
    D = ctx.cos.shape[-1]
    q = q_proj(x).view(B, T, -1, D).transpose(1, 2)  # (B, H, T, D)
    k = k_proj(x).view(B, T, -1, D).transpose(1, 2)  # (B, Hkv, T, D)
    v = v_proj(x).view(B, T, -1, D).transpose(1, 2)
    q, k = ctx.rope(q), ctx.rope(k)
    k, v = ctx.keys_values(layer_idx, k, v)  # (B, Hkv, S, D)
    y = ctx.attend(q, k, v)  # (B, H, T, D)
    return o_proj(y.transpose(1, 2).reshape(B, T, -1))


class DiffusionLM(nn.Module):
    """Base class; subclasses build `embed`, `layers`, `norm`, `head` with their public names."""

    config: ModelConfig

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.attn_backend = SDPABackend()
        self.gradient_checkpointing = False
        self.name_or_path = ""  # read by PEFT when it saves an adapter

    # subclasses provide these four
    def embed(self, input_ids: Tensor) -> Tensor: raise NotImplementedError
    def layers(self) -> nn.ModuleList: raise NotImplementedError
    def final_norm(self, x: Tensor) -> Tensor: raise NotImplementedError
    def head(self, x: Tensor) -> Tensor: raise NotImplementedError

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None, mask=None,
                cache: KVCache | None = None, offset: int = 0) -> Tensor:
        ctx = self.attn_context(input_ids, position_ids, mask, cache, offset)
        x = self.embed(input_ids)  # (B, T, C)
        for layer in self.layers():
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, ctx, use_reentrant=False)
            else:
                x = layer(x, ctx)
        return self.head(self.final_norm(x))  # (B, T, V)

    def attn_context(self, input_ids: Tensor, position_ids: Tensor | None, mask, cache: KVCache | None,
                     offset) -> AttnContext:
        """The forward's arguments (see the module docstring) as the layers read them."""
        B, T = input_ids.shape
        cfg = self.config
        if position_ids is None:
            position_ids = (torch.arange(T, device=input_ids.device) + offset).expand(B, T)
        if mask is None and cfg.is_causal:
            mask = causal()
        kv_len, k_offset = (cache.kv_len(offset, T), 0) if cache is not None else (T, offset)
        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, self.dtype)
        return AttnContext(mask, offset, T, k_offset, kv_len, input_ids.device, self.attn_backend, cos, sin, cache)

    # ---- conveniences users of HF models expect ------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def gradient_checkpointing_enable(self, **_):
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        self.gradient_checkpointing = False

    def get_input_embeddings(self) -> nn.Embedding: raise NotImplementedError

    def get_output_embeddings(self) -> nn.Module | None: raise NotImplementedError

    def tie_weights(self):
        """Share the output head with the embedding when the config says so."""

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None):
        """Random init for models built from scratch (the testbed); checkpoints overwrite this."""
        from d2f.models.common import RMSNorm
        norms = {id(m.weight) for m in self.modules() if isinstance(m, RMSNorm)}
        for p in self.parameters():
            if id(p) in norms:
                nn.init.ones_(p)
            elif p.dim() == 1:  # biases
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=std, generator=generator)
        self.tie_weights()

    def save_pretrained(self, save_directory, **kw):
        from d2f.models.io import save_pretrained
        save_pretrained(self, save_directory, **kw)


def swiglu(x: Tensor, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> Tensor:
    return down(F.silu(gate(x)) * up(x))
