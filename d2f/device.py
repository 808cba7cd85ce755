"""The dtype and device a model is loaded with, checked before anything loads: `infer.api.load` and
`d2f.models.from_pretrained` / `load_model` refuse the same values with the same messages.

    dtype = parse_dtype("bf16")        # torch.bfloat16; a torch dtype passes through if it is a float dtype
    check_device("cuda")               # a UserError on a machine without CUDA
"""
from __future__ import annotations

import torch

from d2f.errors import UserError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class DeviceError(UserError):
    """A dtype or device a model cannot be loaded with on this machine."""


def parse_dtype(dtype, error: type[UserError] = DeviceError) -> torch.dtype:
    """A dtype name of DTYPES or one of the float torch dtypes they name; anything else is `error`."""
    if isinstance(dtype, torch.dtype):
        if dtype not in FLOAT_DTYPES:
            raise error(f"dtype {dtype} cannot hold model weights; use one of "
                        f"{', '.join(str(d) for d in FLOAT_DTYPES)} (or their names {sorted(DTYPES)})")
        return dtype
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise error(f"dtype {dtype!r} is not one of {sorted(DTYPES)} (or a float torch dtype such as torch.float32)")
    return DTYPES[dtype]


def check_device(device, error: type[UserError] = DeviceError, use_cpu: str = "--device cpu") -> None:
    """Refuse a device this machine does not have before anything is loaded; `use_cpu` is how the caller
    spells the fix ('--device cpu' on a command line, "device='cpu'" in Python)."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise error(f"device {device!r} is not a device name; use cpu, cuda, cuda:N or mps") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise error(f"device {device!r}: this machine has no CUDA GPU (torch.cuda.is_available() is "
                        f"False); use {use_cpu}")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise error(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                        f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise error(f"device {device!r}: MPS is not available on this machine; use {use_cpu}")
    elif d.type not in ("cpu", "cuda", "mps"):
        raise error(f"device {device!r} is not supported; use cpu, cuda, cuda:N or mps")
