"""Keep freed memory in the process on CPU training runs (glibc malloc tuning).

Why: a training step allocates and frees the same activation and gradient buffers (tens of MB each)
every step. By default glibc returns freed memory at the top of the heap to the kernel (trim
threshold ~128 kB, raised dynamically) and serves big blocks with fresh mmaps, so every step
page-faults its buffers in again and the kernel zero-fills them. The thresholds below keep those
buffers in the process, the same effect jemalloc or tcmalloc give (PyTorch's CPU performance guide
recommends them; they are not pip-installable dependencies, mallopt is in every glibc); what it
buys on the tiny config: docs/benchmarks.md, "What buys it". Cost: up to TRIM_THRESHOLD of freed
memory stays mapped. A no-op on other C libraries.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 1 << 30   # keep up to 1 GiB of freed heap instead of returning it each step
MMAP_THRESHOLD = 32 << 20  # glibc's maximum; fixing it also stops the dynamic threshold changes


def keep_freed_memory() -> bool:
    """Apply the thresholds through glibc's mallopt; False where there is no glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
