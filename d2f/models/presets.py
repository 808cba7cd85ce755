"""Named model configs: the public 8B/7B checkpoints and tiny ones for tests."""
from __future__ import annotations

from pathlib import Path

from d2f.models.config import ModelConfig

REPO_ROOT = Path(__file__).resolve().parents[2]

# name -> (hub id or None, config). A preset with a hub id loads its weights from there.
PRESETS: dict[str, tuple[str | None, ModelConfig]] = {
    "llada-8b": ("GSAI-ML/LLaDA-8B-Instruct", ModelConfig(
        arch="llada", vocab_size=126464, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
        intermediate_size=12288, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=4096,
        mask_token_id=126336, eos_token_id=126081, pad_token_id=126081)),
    "dream-7b": ("Dream-org/Dream-v0-Instruct-7B", ModelConfig(
        arch="dream", vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
        intermediate_size=18944, rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=131072,
        mask_token_id=151666, eos_token_id=151643, pad_token_id=151643, bos_token_id=151643, qkv_bias=True)),
    "tiny-llada": (None, ModelConfig(
        arch="llada", vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
        intermediate_size=128, rope_theta=10000.0, max_position_embeddings=512,
        mask_token_id=127, eos_token_id=1, pad_token_id=1)),
    "tiny-llada-gqa": (None, ModelConfig(
        arch="llada", vocab_size=128, embedding_size=136, hidden_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, intermediate_size=128, rope_theta=10000.0, max_position_embeddings=512,
        mask_token_id=127, eos_token_id=1, pad_token_id=1)),
    "tiny-dream": (None, ModelConfig(
        arch="dream", vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=128, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=512,
        mask_token_id=127, eos_token_id=1, pad_token_id=1, qkv_bias=True)),
    "tiny-ar": (None, ModelConfig(
        arch="llada", vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
        intermediate_size=128, rope_theta=10000.0, max_position_embeddings=512,
        mask_token_id=127, eos_token_id=1, pad_token_id=1, is_causal=True)),
}


def preset_config(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name][1].replace()
