"""The `accelerate.Accelerator` both training recipes run under, for every way they are launched.

    python train/<recipe>.py ...                                   one plain process (CPU or one GPU)
    accelerate launch --config_file configs/accelerate/cpu_ddp.yaml   DDP over gloo, several CPU processes
    accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml   DeepSpeed ZeRO-2

Why a helper: several processes without GPUs need the gloo backend, and (except under DeepSpeed, which
sets up its own process group) accelerate must be told it is on the CPU, or it silently runs the
processes side by side without synchronising their gradients. A launch that asks for several processes
but ends up with no distributed backend is an error here rather than N independent runs.
"""
from __future__ import annotations

import os

import torch


def make_accelerator(gradient_accumulation_steps: int = 1, mixed_precision: str = "no"):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu_multi = distributed and not torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    accelerator = Accelerator(gradient_accumulation_steps=gradient_accumulation_steps,
                              mixed_precision=mixed_precision, cpu=cpu_multi and not deepspeed,
                              kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if cpu_multi else [])
    if distributed and accelerator.distributed_type.value == "NO":
        raise RuntimeError(f"launched as {os.environ['WORLD_SIZE']} processes but accelerate set up no distributed "
                           "backend; check the accelerate config (see configs/accelerate/)")
    return accelerator
