"""Our LLaDA and Dream implementations and how to get one.

    model = load_model("tiny-llada")                 # preset, random weights
    model = load_model("GSAI-ML/LLaDA-8B-Instruct", dtype=torch.bfloat16, device="cuda")
    model = load_model("path/to/checkpoint")         # config.json + safetensors
"""
from __future__ import annotations

import torch

from d2f.models.common import shift_logits
from d2f.models.config import ModelConfig, ModelConfigError
from d2f.models.dream import DreamModel
from d2f.models.io import CheckpointError, build_model, from_pretrained, save_pretrained
from d2f.models.llada import LLaDAModelLM
from d2f.models.presets import PRESETS, preset_config

__all__ = ["ModelConfig", "ModelConfigError", "CheckpointError", "LLaDAModelLM", "DreamModel", "load_model",
           "build_model", "from_pretrained", "save_pretrained", "shift_logits", "PRESETS", "preset_config"]


def load_model(name_or_path: str, dtype: torch.dtype | None = None, device=None, seed: int = 0):
    """A preset name, a hub id, or a local checkpoint directory. dtype: a torch float dtype or its name
    ("float32", "bf16", ...); device: checked against this machine before anything loads."""
    from d2f.models.io import check_load_args
    dtype, device = check_load_args(name_or_path, dtype, device)
    if name_or_path in PRESETS:
        hub_id, cfg = PRESETS[name_or_path]
        if hub_id is None:
            return build_model(cfg.replace(), dtype=dtype or torch.float32, device=device, seed=seed)
        return from_pretrained(hub_id, dtype=dtype, device=device)
    return from_pretrained(name_or_path, dtype=dtype, device=device)
