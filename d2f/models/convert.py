"""Moving weights between our two layouts: a LLaDA-layout (OLMo names) checkpoint into the Dream
(Qwen2) layout, as Dream itself starts from Qwen2.5's AR weights.

The blocks compute the same function (RMSNorm, RoPE attention, SwiGLU MLP): the conversion renames the
tensors and gives Qwen2's q/k/v projections zero biases, so the converted model's logits equal the
source's exactly under the same attention pattern. Used by `train/pretrain.py` when `init_from` holds
LLaDA-layout weights (e.g. the AR baseline `testbed/ar`) and `model.arch` is `dream`.
"""
from __future__ import annotations

import torch


def llada_to_dream(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """A LLaDAModelLM state dict -> a DreamModel state dict (the same function, q/k/v biases zero; a tied
    LLaDA head, which has no ff_out, becomes an lm_head equal to the embedding)."""
    src, out = "model.transformer.", {}
    out["model.embed_tokens.weight"] = state[src + "wte.weight"]
    out["model.norm.weight"] = state[src + "ln_f.weight"]
    out["lm_head.weight"] = state.get(src + "ff_out.weight", state[src + "wte.weight"])
    names = {"attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm", "attn_out": "self_attn.o_proj",
             "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "ff_out": "mlp.down_proj",
             "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj"}
    for i in range(num_layers):
        a, b = f"{src}blocks.{i}.", f"model.layers.{i}."
        for theirs, ours in names.items():
            out[f"{b}{ours}.weight"] = state[f"{a}{theirs}.weight"]
        for x in "qkv":
            bias = state.get(f"{a}{x}_proj.bias")
            w = state[f"{a}{x}_proj.weight"]
            out[f"{b}self_attn.{x}_proj.bias"] = bias if bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
    return out
