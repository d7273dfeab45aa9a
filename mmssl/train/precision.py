"""Mixed precision: which autocast to run the forward pass under, and whether a grad scaler is needed.

bf16 keeps fp32's exponent range, so it needs no loss scaling and works under autocast on CPU and
CUDA alike; fp16 (CUDA only) underflows small gradients and therefore comes with a GradScaler.
The parameters and the optimizer state stay fp32 in every mode.
"""
from __future__ import annotations

import contextlib

import torch

from mmssl.errors import UserError

PRECISIONS = ("fp32", "bf16", "fp16")


def check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise UserError(f"bad value for train.precision: {precision!r} (expected one of {', '.join(PRECISIONS)})")
    if precision == "fp16" and device.type != "cuda":
        raise UserError("train.precision=fp16 needs a CUDA device; use bf16 on CPU")


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the matmuls run in."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(precision: str, device: torch.device):
    """Context manager for the forward pass and the loss."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=compute_dtype(precision))


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 (a disabled one is a no-op with a state_dict)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
