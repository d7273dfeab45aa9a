"""Which scaled-dot-product-attention kernel the training step uses on CPU.

Why: torch's CPU flash-attention kernel has a slow backward for short bf16 sequences, where the
math kernel (batched matmuls) is faster; for longer bf16 sequences, and in fp32 at every length,
flash is the faster one (timings: docs/benchmarks.md, "What buys it"). So bf16 runs whose longest
sequence is at most MATH_MAX_TOKENS use the math kernel; everything else, and every CUDA run,
keeps torch's own choice.
"""
from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

MATH_MAX_TOKENS = 160


def longest_sequence(model) -> int:
    """The most tokens any attention layer of an open_clip dual encoder sees (0 when unknown)."""
    lengths = [getattr(model, "context_length", 0) or 0]
    visual = getattr(model, "visual", None)
    pos = getattr(visual, "positional_embedding", None)
    if isinstance(pos, torch.Tensor):
        lengths.append(pos.shape[0])
    elif visual is not None and not hasattr(visual, "attnpool"):
        return 0  # a timm or other tower whose token count we cannot read: leave torch's choice
    return max(lengths)


def training_attention(model, device: torch.device, compute_dtype: torch.dtype):
    """Context manager for forward + backward: the math kernel where it measured faster, else a no-op."""
    tokens = longest_sequence(model)
    if device.type == "cpu" and compute_dtype == torch.bfloat16 and 0 < tokens <= MATH_MAX_TOKENS:
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()
