"""The decoding settings of every mode: one dataclass, validated, with no torch import (commands parse
and check their options before anything heavy loads). `infer.api` re-exports all of it.

    cfg = DecodeConfig(mode="d2f", max_new_tokens=128, block_size=16, tau_conf=0.99)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from d2f.errors import UserError

MODES = ("vanilla", "fast-dllm", "d2f", "ar")
CACHES = ("none", "prefix", "dual")
RULES = ("topk", "threshold", "factor")


class DecodeConfigError(UserError):
    """A bad decoding setting."""


@dataclass
class DecodeConfig:
    mode: str = "d2f"
    max_new_tokens: int = 256  # gen length (the answer budget)
    block_size: int = 32
    steps: int | None = None  # vanilla / fast-dllm topk: total forwards; default = max_new_tokens
    temperature: float = 0.0  # 0 = greedy; > 0 = Gumbel-max in float64
    cache: str = "prefix"  # fast-dllm: none | prefix | dual. d2f: "none" = recompute everything (reference)
    rule: str = "threshold"  # fast-dllm commit rule: topk | threshold | factor
    threshold: float = 0.9
    factor: float = 1.0
    tau_add: float = 0.7
    tau_act: float = 0.95
    tau_conf: float = 0.9
    seed: int = 0

    def __post_init__(self):
        self.validate()

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps is not None else self.max_new_tokens

    def validate(self) -> "DecodeConfig":
        err = DecodeConfigError
        if self.mode not in MODES:
            raise err(f"mode {self.mode!r} is not one of {MODES}")
        for name in ("max_new_tokens", "block_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise err(f"{name} must be a positive integer, got {v!r}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps <= 0):
            raise err(f"steps must be a positive integer, got {self.steps!r}")
        for name in ("temperature", "threshold", "factor", "tau_add", "tau_act", "tau_conf"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise err(f"{name} must be a finite number, got {v!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise err(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if not self.temperature >= 0:
            raise err(f"temperature must be >= 0, got {self.temperature!r}")
        for name in ("threshold", "tau_add", "tau_act", "tau_conf"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise err(f"{name} must be in [0, 1], got {v!r}")
        if not self.factor > 0:
            raise err(f"factor must be > 0, got {self.factor!r}")
        if self.cache not in CACHES:
            raise err(f"cache {self.cache!r} is not one of {CACHES}")
        if self.rule not in RULES:
            raise err(f"rule {self.rule!r} is not one of {RULES}")
        if self.mode != "ar" and self.max_new_tokens % self.block_size:
            raise err(f"max_new_tokens {self.max_new_tokens} is not a multiple of block_size {self.block_size} "
                      f"(mode {self.mode!r} decodes whole blocks); e.g. use max_new_tokens "
                      f"{-(-self.max_new_tokens // self.block_size) * self.block_size}")
        if self.mode == "d2f" and self.cache not in ("prefix", "none"):
            raise err(f"cache {self.cache!r} does not apply to mode 'd2f', whose block cache is exact: use 'prefix' "
                      "(the default) or 'none' (recompute every forward, the reference)")
        if self.mode == "vanilla" or (self.mode == "fast-dllm" and self.rule == "topk"):
            if self.total_steps > self.max_new_tokens:
                raise err(f"steps {self.total_steps} is more than max_new_tokens {self.max_new_tokens}: every step "
                          "commits at least one token, so at most max_new_tokens steps can do anything")
            n_blocks = self.max_new_tokens // self.block_size
            if self.total_steps % n_blocks:
                raise err(f"steps {self.total_steps} is not a multiple of the number of blocks {n_blocks} "
                          f"(max_new_tokens {self.max_new_tokens} / block_size {self.block_size})")
        return self


# The embedded testbed's decoding settings (the README's tables, the cards, configs/compare_testbed.yaml): 128
# answer slots; the teacher's vanilla decoding one token per step in blocks of 32, as LLaDA decodes GSM8K; the
# D2F student in blocks of 16 at tau_conf 0.99 (the testbed's models are far surer than an 8B model).
TESTBED = {
    "vanilla": dict(mode="vanilla", max_new_tokens=128, block_size=32, steps=128),
    "d2f": dict(mode="d2f", max_new_tokens=128, block_size=16, tau_add=0.7, tau_act=0.95, tau_conf=0.99),
    "ar": dict(mode="ar", max_new_tokens=128),
}


# the settings each mode reads; a setting given for a mode that ignores it is an error, not a silent no-op
COMMON_FIELDS = {"mode", "max_new_tokens", "temperature", "seed"}
MODE_FIELDS = {
    "vanilla": COMMON_FIELDS | {"block_size", "steps"},
    "fast-dllm": COMMON_FIELDS | {"block_size", "steps", "cache", "rule", "threshold", "factor"},
    "d2f": COMMON_FIELDS | {"block_size", "cache", "tau_add", "tau_act", "tau_conf"},
    "ar": COMMON_FIELDS,
}


def check_fields_apply(mode: str, given, where: str = "") -> None:
    """Refuse settings (`given`: the names set explicitly) that `mode` does not read."""
    if mode not in MODE_FIELDS:
        return  # validate() names the bad mode
    unused = sorted(set(given) - MODE_FIELDS[mode])
    if unused:
        raise DecodeConfigError(f"{where}{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply to mode "
                                f"{mode!r} (it reads {', '.join(sorted(MODE_FIELDS[mode] - {'mode'}))}); drop "
                                f"{'it' if len(unused) == 1 else 'them'}")
