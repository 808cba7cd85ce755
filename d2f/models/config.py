"""One architecture config for LLaDA and Dream, read from / written to their public config.json keys."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from d2f.errors import UserError

# config.json key (public checkpoint) -> our field, per architecture.
LLADA_KEYS = {
    "vocab_size": "vocab_size", "embedding_size": "embedding_size", "d_model": "hidden_size",
    "n_layers": "num_layers", "n_heads": "num_heads", "n_kv_heads": "num_kv_heads",
    "mlp_hidden_size": "intermediate_size", "rope_theta": "rope_theta", "rms_norm_eps": "rms_norm_eps",
    "max_sequence_length": "max_position_embeddings", "mask_token_id": "mask_token_id",
    "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id", "bos_token_id": "bos_token_id",
    "weight_tying": "tie_word_embeddings",
}
DREAM_KEYS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads",
    "intermediate_size": "intermediate_size", "rope_theta": "rope_theta", "rms_norm_eps": "rms_norm_eps",
    "max_position_embeddings": "max_position_embeddings", "mask_token_id": "mask_token_id",
    "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id", "bos_token_id": "bos_token_id",
    "tie_word_embeddings": "tie_word_embeddings",
}
ARCHES = ("llada", "dream")
# config.json keys with no safe default: they set the shapes and the positions of the checkpoint's own
# weights, so a missing one is an error, never a silent 8B default
REQUIRED_KEYS = {"llada": ("vocab_size", "d_model", "n_layers", "n_heads", "rope_theta"),
                 "dream": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size", "rope_theta")}
# the mask token of each family when config.json does not name it (LLaDA's generate.py hard-codes it)
DEFAULT_MASK_ID = {"llada": 126336, "dream": 151666}


class ModelConfigError(UserError):
    pass


@dataclass
class ModelConfig:
    arch: str = "llada"
    vocab_size: int = 126464
    embedding_size: int | None = None  # LLaDA: rows of wte / ff_out, may exceed vocab_size
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None
    intermediate_size: int = 12288
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    mask_token_id: int = 126336
    eos_token_id: int | None = 126081
    pad_token_id: int | None = 126081
    bos_token_id: int | None = None
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    is_causal: bool = False  # True for the same-architecture AR baseline
    extra: dict = field(default_factory=dict)  # other config.json keys, written back unchanged

    def __post_init__(self):
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.embedding_size is None:
            self.embedding_size = self.vocab_size
        self.validate()

    def validate(self):
        if self.arch not in ARCHES:
            raise ModelConfigError(f"arch {self.arch!r} is not supported; expected one of {ARCHES}")
        for name in ("vocab_size", "embedding_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ModelConfigError(f"{name} must be a positive integer, got {v!r}")
        for name in ("rope_theta", "rms_norm_eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ModelConfigError(f"{name} must be a finite number > 0, got {v!r}")
        for name in ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise ModelConfigError(f"{name} must be an integer token id, got {v!r}")
        if self.hidden_size % self.num_heads:
            raise ModelConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ModelConfigError(f"head_dim {self.hidden_size // self.num_heads} must be even for RoPE")
        if self.embedding_size < self.vocab_size:
            raise ModelConfigError(f"embedding_size {self.embedding_size} < vocab_size {self.vocab_size}")
        rows = self.embedding_size
        for name in ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id"):
            tok = getattr(self, name)
            if tok is not None and not 0 <= tok < rows:
                raise ModelConfigError(f"{name} {tok} is outside the vocabulary [0, {rows})")
        for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
            if not self.is_causal and getattr(self, name) == self.mask_token_id:
                raise ModelConfigError(f"mask_token_id {self.mask_token_id} is also the {name}: a diffusion LM's mask "
                                       "token must be its own token; check config.json")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def logits_shift(self) -> int:
        """1 if row i of the logits predicts token i+1 (Dream), 0 if it predicts token i (LLaDA)."""
        return 1 if self.arch == "dream" else 0

    # ---- public config.json <-> ModelConfig -------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        model_type = str(d.get("model_type", "")).lower()
        if model_type == "llada":
            arch, keys = "llada", LLADA_KEYS
        elif model_type == "dream":
            arch, keys = "dream", DREAM_KEYS
        else:
            raise ModelConfigError(f"config.json model_type {d.get('model_type')!r} is not supported; "
                                   "expected 'llada' (LLaDA) or 'Dream' (Dream)")
        missing = [k for k in REQUIRED_KEYS[arch] if d.get(k) is None]
        if missing:
            raise ModelConfigError(f"config.json (model_type {d.get('model_type')!r}) is missing {', '.join(missing)}: "
                                   "they set the shapes and positions of the checkpoint's weights and have no safe "
                                   "default; add them from the checkpoint's original config.json")
        kw = {ours: d[theirs] for theirs, ours in keys.items() if theirs in d}
        kw.setdefault("mask_token_id", DEFAULT_MASK_ID[arch])
        if arch == "llada":
            if "intermediate_size" not in kw:  # OLMo falls back to mlp_ratio * d_model
                kw["intermediate_size"] = int(d.get("mlp_ratio", 4) * d["d_model"])
            kw["qkv_bias"] = bool(d.get("include_bias", False) or d.get("include_qkv_bias", False))
        else:
            kw["qkv_bias"] = True  # Qwen2 attention always has q/k/v biases
        kw["is_causal"] = bool(d.get("is_causal", False))
        known = set(keys) | {"include_bias", "include_qkv_bias", "is_causal", "mlp_ratio"}
        kw["extra"] = {k: v for k, v in d.items() if k not in known}
        return cls(arch=arch, **kw)

    def to_hf_dict(self) -> dict:
        keys = LLADA_KEYS if self.arch == "llada" else DREAM_KEYS
        d = dict(self.extra)
        if self.arch == "llada":
            d.setdefault("model_type", "llada")
            d.setdefault("architectures", ["LLaDAModelLM"])
            for k, v in {"block_type": "llama", "layer_norm_type": "rms", "activation_type": "silu",
                         "rope": True, "alibi": False}.items():
                d.setdefault(k, v)
            d["include_bias"] = False
            d["include_qkv_bias"] = self.qkv_bias
        else:
            d.setdefault("model_type", "Dream")
            d.setdefault("architectures", ["DreamModel"])
            d.setdefault("hidden_act", "silu")
        for theirs, ours in keys.items():
            d[theirs] = getattr(self, ours)
        if self.is_causal:
            d["is_causal"] = True
        return d

    # HF-style accessors that PEFT and accelerate look for on `model.config`.
    @classmethod
    def from_pretrained(cls, name_or_path) -> "ModelConfig":
        from d2f.models.io import read_config, resolve_checkpoint
        return read_config(resolve_checkpoint(name_or_path))

    def to_dict(self) -> dict:
        return self.to_hf_dict()

    def get(self, key, default=None):
        return getattr(self, key, default)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)
