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

How attention is computed is the backend's business (`model.attn_backend`, SDPA by default);
it is swapped from outside (`kernels.set_backend`), like LoRA and torch.compile.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from d2f.cache import KVCache
from d2f.masks import causal
from d2f.models.common import SDPABackend, apply_rope, rope_cos_sin
from d2f.models.config import ModelConfig


def self_attention(x: Tensor, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear, o_proj: nn.Linear,
                   cfg: ModelConfig, cos: Tensor, sin: Tensor, backend, prepared,
                   cache: KVCache | None, layer: int, offset: int) -> Tensor:
    B, T, _ = x.shape
    H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
    k = k_proj(x).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
    v = v_proj(x).view(B, T, Hkv, D).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache is not None:
        k, v = cache.update(layer, offset, k, v)  # (B, Hkv, S, D)
    y = backend(q, k, v, prepared)  # (B, H, T, D)
    return o_proj(y.transpose(1, 2).reshape(B, T, H * D))


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
        B, T = input_ids.shape
        cfg = self.config
        if position_ids is None:
            position_ids = (torch.arange(T, device=input_ids.device) + offset).expand(B, T)
        if mask is None and cfg.is_causal:
            mask = causal()
        kv_len, k_offset = (cache.kv_len(offset, T), 0) if cache is not None else (T, offset)
        prepared = self.attn_backend.prepare(mask, offset, T, k_offset, kv_len, input_ids.device)
        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, self.dtype)
        x = self.embed(input_ids)  # (B, T, C)
        for i, layer in enumerate(self.layers()):
            args = (x, cos, sin, self.attn_backend, prepared, cache, i, offset)
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        return self.head(self.final_norm(x))  # (B, T, V)

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
