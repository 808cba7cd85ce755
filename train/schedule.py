"""The learning-rate schedule of both recipes: linear warmup to the base lr, then a constant, cosine
or linear factor that reaches min_ratio * base lr at total_steps and stays there."""
import math

import torch

KINDS = ("constant", "cosine", "linear")


def lr_factor(step: int, warmup_steps: int, total_steps: int, kind: str = "cosine", min_ratio: float = 0.0) -> float:
    """The multiplier of the base lr at optimizer step `step` (0-based)."""
    if kind not in KINDS:
        raise ValueError(f"lr schedule {kind!r} is not one of {KINDS}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))  # decay progress in [0, 1]
    decay = 0.5 * (1 + math.cos(math.pi * t)) if kind == "cosine" else 1 - t
    return min_ratio + (1 - min_ratio) * decay


def warmup_then_decay(optimizer, warmup_steps: int, total_steps: int, kind: str = "cosine",
                      min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    lr_factor(0, warmup_steps, total_steps, kind, min_ratio)  # bad kind: fail here, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, kind, min_ratio))
