"""Dream (Qwen2: q/k/v biases, GQA, RoPE) with the public checkpoint's names:

model.embed_tokens, model.layers.{i}.self_attn.{q,k,v,o}_proj, model.layers.{i}.mlp.{gate,up,down}_proj,
model.layers.{i}.{input_layernorm, post_attention_layernorm}, model.norm, lm_head.

Row i of Dream's logits predicts token i+1 (`config.logits_shift == 1`); decoders align them
with `d2f.models.common.shift_logits`.
"""
from __future__ import annotations

from torch import Tensor, nn

from d2f.models.base import AttnContext, DiffusionLM, self_attention, swiglu
from d2f.models.common import RMSNorm
from d2f.models.config import ModelConfig


class DreamAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(C, C, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(C, kv, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(C, kv, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(C, C, bias=False)


class DreamMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)


class DreamDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # its slot in the KV cache
        self.self_attn = DreamAttention(cfg)
        self.mlp = DreamMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, ctx: AttnContext) -> Tensor:
        a = self.self_attn
        x = x + self_attention(self.input_layernorm(x), ctx, self.layer_idx, a.q_proj, a.k_proj, a.v_proj, a.o_proj)
        m = self.mlp
        return x + swiglu(self.post_attention_layernorm(x), m.gate_proj, m.up_proj, m.down_proj)


class DreamBaseModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DreamDecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DreamModel(DiffusionLM):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.model = DreamBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed(self, input_ids):
        return self.model.embed_tokens(input_ids)

    def layers(self):
        return self.model.layers

    def final_norm(self, x):
        return self.model.norm(x)

    def head(self, x):
        return self.lm_head(x)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head
