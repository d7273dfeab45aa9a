"""Where a job runs and in what precision: the one policy for training, evaluation and serving.

Device: the CUDA device when there is one (a torchrun rank takes its local one), else the CPU.

Precision names: `fp32`; `bf16` (autocast to bfloat16, no loss scaling: bf16 keeps fp32's
exponent range); `fp16` (CUDA only, with a GradScaler against underflowing gradients); `auto`,
which is bf16 where the hardware multiplies bf16 natively (CUDA, CPUs with AVX512-BF16 or AMX)
and fp32 elsewhere, because a CPU without it emulates bf16 far slower than it runs fp32.
Parameters and optimizer state stay fp32 in every mode; the towers run under autocast, the loss
functions in fp32 (`mmssl.objective`).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch

from mmssl.config import PRECISIONS, one_of
from mmssl.errors import UserError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_device(local_rank: Optional[int] = None) -> torch.device:
    """The device a job uses: the CUDA device (number `local_rank` for a torchrun rank), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda") if local_rank is None else torch.device("cuda", local_rank)


@functools.lru_cache(maxsize=None)
def _cpu_has_native_bf16() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run in hardware on this device (else they are emulated)."""
    return device.type == "cuda" or (device.type == "cpu" and _cpu_has_native_bf16())


def fast_matmul_dtype(device: torch.device) -> torch.dtype:
    """bf16 where it is native on this device, else fp32: for work that wants the fastest matmuls
    whatever the run's precision (Muon's Newton-Schulz iteration)."""
    return torch.bfloat16 if native_bf16(device) else torch.float32


def resolve_precision(precision: str, device: torch.device, key: str = "train.precision") -> str:
    """`fp32`, `bf16` or `fp16` for a precision name on this device; a UserError naming `key` if it cannot run.

    An explicit `bf16` on a CPU without native bf16 runs (it is what was asked; see `emulation_note`).
    """
    if precision not in PRECISIONS:
        raise UserError(f"bad value for {key}: {precision!r} ({one_of(PRECISIONS)})")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise UserError(f"{key}=fp16 needs a CUDA device; use bf16 or auto on CPU")
    return precision


def emulation_note(precision: str, device: torch.device, key: str = "train.precision") -> Optional[str]:
    """A one-line warning when a resolved bf16 will be emulated on this device, else None."""
    if precision != "bf16" or native_bf16(device):
        return None
    return (f"mmssl: note: {key}=bf16 on a CPU without native bf16 (no AVX512-BF16/AMX) is emulated and much "
            f"slower than fp32; {key}=auto picks fp32 here")


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the matmuls run in for a resolved precision."""
    return _DTYPES[precision]


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """The autocast dtype of a resolved precision; None for fp32 (no autocast)."""
    return None if precision == "fp32" else _DTYPES[precision]


def autocast(precision: str, device: torch.device):
    """Context manager for the tower forwards under a resolved precision."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 (a disabled one is a no-op with a state_dict)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
