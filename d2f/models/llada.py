"""LLaDA (Llama-like: RMSNorm, SwiGLU, RoPE) with the public checkpoint's OLMo-style names:

model.transformer.wte, model.transformer.blocks.{i}.{attn_norm, q_proj, k_proj, v_proj, attn_out,
ff_norm, ff_proj, up_proj, ff_out}, model.transformer.ln_f, model.transformer.ff_out.
"""
from __future__ import annotations

from torch import Tensor, nn

from d2f.models.base import AttnContext, DiffusionLM, self_attention, swiglu
from d2f.models.common import RMSNorm
from d2f.models.config import ModelConfig


class LLaDABlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # its slot in the KV cache
        C, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
        self.attn_norm = RMSNorm(C, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(C, C, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(C, kv, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(C, kv, bias=cfg.qkv_bias)
        self.attn_out = nn.Linear(C, C, bias=False)
        self.ff_norm = RMSNorm(C, cfg.rms_norm_eps)
        self.ff_proj = nn.Linear(C, cfg.intermediate_size, bias=False)  # the SwiGLU gate
        self.up_proj = nn.Linear(C, cfg.intermediate_size, bias=False)
        self.ff_out = nn.Linear(cfg.intermediate_size, C, bias=False)

    def forward(self, x: Tensor, ctx: AttnContext) -> Tensor:
        x = x + self_attention(self.attn_norm(x), ctx, self.layer_idx, self.q_proj, self.k_proj, self.v_proj,
                               self.attn_out)
        return x + swiglu(self.ff_norm(x), self.ff_proj, self.up_proj, self.ff_out)


class LLaDAModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        modules = dict(
            wte=nn.Embedding(cfg.embedding_size, cfg.hidden_size),
            blocks=nn.ModuleList(LLaDABlock(cfg, i) for i in range(cfg.num_layers)),
            ln_f=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
        )
        if not cfg.tie_word_embeddings:
            modules["ff_out"] = nn.Linear(cfg.hidden_size, cfg.embedding_size, bias=False)
        self.transformer = nn.ModuleDict(modules)


class LLaDAModelLM(DiffusionLM):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.model = LLaDAModel(config)

    def embed(self, input_ids):
        return self.model.transformer.wte(input_ids)

    def layers(self):
        return self.model.transformer.blocks

    def final_norm(self, x):
        return self.model.transformer.ln_f(x)

    def head(self, x):
        t = self.model.transformer
        if self.config.tie_word_embeddings:
            return nn.functional.linear(x, t.wte.weight)
        return t.ff_out(x)

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def get_output_embeddings(self):
        t = self.model.transformer
        return t.wte if self.config.tie_word_embeddings else t.ff_out
