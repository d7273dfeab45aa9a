"""Clustered random unit vectors that behave like real embeddings, for tests and benchmarks.

Why not plain Gaussian noise: in 512 dimensions i.i.d. random vectors are all nearly equidistant,
which makes approximate search look far worse than on real embeddings, whose neighbourhoods live
on a low-dimensional manifold. Here each vector is a cluster centre plus a displacement drawn in a
low-rank subspace plus a little full-rank noise, then normalised. Generated chunk by chunk, each
chunk from its own seed, so 1M x 512 never needs more than one chunk of temporaries and the
result does not depend on the chunk size.
"""
from __future__ import annotations

import numpy as np

CHUNK = 50_000


def clustered_vectors(n: int, dim: int, num_clusters: int = 1000, rank: int = 32, spread: float = 0.6,
                      noise: float = 0.05, seed: int = 0, out: np.ndarray | None = None) -> np.ndarray:
    """(n, dim) float32 unit rows; `out` may be a preallocated (memory-mapped) array to fill."""
    base = np.random.default_rng(seed)
    centres = base.standard_normal((num_clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    basis = base.standard_normal((rank, dim)).astype(np.float32) / np.sqrt(dim)
    result = np.empty((n, dim), dtype=np.float32) if out is None else out
    for chunk_no, start in enumerate(range(0, n, CHUNK)):
        rows = min(CHUNK, n - start)
        rng = np.random.default_rng([seed, chunk_no])
        labels = rng.integers(0, num_clusters, size=rows)
        block = centres[labels]
        block += spread * (rng.standard_normal((rows, rank)).astype(np.float32) @ basis)
        block += noise * rng.standard_normal((rows, dim)).astype(np.float32) / np.sqrt(dim)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        result[start:start + rows] = block
    return result
