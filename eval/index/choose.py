"""Pick a FAISS index type from the collection size and a memory budget.

Why a rule and not a sweep: building candidate indexes on millions of vectors costs minutes each.
autofaiss (`get_optimal_index_keys_v2`) prefers an `HNSW{M}` graph whenever it fits, IVF-Flat
below 1M vectors otherwise, and `OPQ..,IVF{nlist}[_HNSW32],PQ..` when only codes fit; it tunes for
one-query-at-a-time latency. We tune for recall@10 against exact search and also serve batches,
and measurements with bench/index.py decided the middle of the order below (the figures:
docs/benchmarks.md, "How the chooser's order was decided"):

- IVF-Flat needs a large share of its cells for recall 0.95 on embedding-like data (intrinsic
  dimension ~32), which makes it slower than a graph, and in batches slower than exact search;
  more cells do not rescue it.
- A graph over 8-bit scalar-quantized vectors (`HNSW{M},SQ8`, 1 byte per dimension) loses almost no
  recall while each hop reads a quarter of the bytes, so it builds and searches faster than a graph
  over float vectors, in less memory.

So, every one inner product on unit vectors:

1. exact `Flat` below 20k vectors (a brute-force scan is then both fast and perfect);
2. `HNSW{M},SQ8` up to 10M vectors when the codes plus 2*M int32 links per vector fit, M = 32
   where room allows and never below 8 (beyond 10M the graph build takes hours on a small box);
3. `IVF{nlist},Flat` (uncompressed lists) when the vectors fit, as `IVF{nlist}_HNSW32,Flat` from
   1024 cells like autofaiss (an HNSW graph over the centroids, so assigning a vector or a query
   to cells costs no scan of all centroids);
4. `OPQ{m}_{d'},IVF{nlist},PQ{m}x8` compressed to m bytes per vector otherwise, with the largest
   m the budget allows.

nlist is the power of two nearest 4*sqrt(N) (autofaiss' rule below 1M vectors; we keep it above
1M too, where autofaiss jumps to 16384+ cells, because k-means over that many cells is an hour on
a small CPU box).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from mmssl.errors import UserError

FLAT_MAX_VECTORS = 20_000     # below this an exact scan of 512-d vectors costs ~1 ms per query
HNSW_MAX_VECTORS = 10_000_000 # beyond this the graph build takes hours on a small CPU box
PQ_MIN_VECTORS = 10_000       # PQ with 256 centroids per sub-quantizer needs ~39*256 training points
HNSW_MAX_M = 32
HNSW_MIN_M = 8
HNSW_EF_CONSTRUCTION = 40     # faiss' default
OPQ_ITERATIONS = 25           # faiss' default is 50; the rotation has mostly converged by 25
PQ_BYTES_CHOICES = (256, 128, 64, 48, 32, 24, 16, 8, 4)
IVF_HNSW_MIN_NLIST = 1024     # autofaiss' switch to an HNSW coarse quantizer (at ~1000 cells)
ID_BYTES = 8                  # inverted lists store one int64 id per vector

_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30, "GB": 2**30,
          "T": 2**40, "TB": 2**40}


@dataclass(frozen=True)
class IndexPlan:
    """What to build: the faiss factory string, its knobs, and why it was chosen."""

    kind: str                      # flat | hnsw_sq8 | ivf_flat | opq_ivf_pq
    factory: str                   # faiss.index_factory description
    memory_bytes: int              # estimated size of the built index
    reason: str
    params: dict = field(default_factory=dict)

    @property
    def search_param(self) -> str | None:
        """The knob that trades speed for recall at query time (None: exact)."""
        return {"hnsw_sq8": "efSearch", "ivf_flat": "nprobe", "opq_ivf_pq": "nprobe"}.get(self.kind)


def parse_memory(text: str | int) -> int:
    """'4G', '512MB', '1.5G', '2000000' -> bytes (binary units, like autofaiss' '4G')."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?B?)\s*", str(text).upper())
    if not match:
        raise UserError(f"bad memory size {text!r}: use a number with an optional unit, e.g. 4G, 512M")
    value = float(match.group(1)) * _UNITS[match.group(2)]
    if value <= 0:
        raise UserError(f"memory size must be positive, got {text!r}")
    return int(value)


def nlist_for(num_vectors: int) -> int:
    """IVF cells: the power of two nearest 4*sqrt(N), capped so each cell trains on >= 40 points."""
    nearest = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(num_vectors))))
    cap = 2 ** int(math.log2(max(1, num_vectors // 40)))
    return max(1, min(nearest, cap))


def flat_bytes(n: int, d: int) -> int:
    return 4 * n * d


def hnsw_sq8_bytes(n: int, d: int, m: int) -> int:
    """One byte per dimension, 2*M level-0 links (int32), ~1 upper-level link on average, per-node
    bookkeeping; plus the quantizer's per-dimension minimum and range."""
    return n * (d + 4 * (2 * m + 1) + 16) + 2 * 4 * d


def ivf_flat_bytes(n: int, d: int, nlist: int) -> int:
    """Vectors and ids in the lists, the centroids, and (from 1024 cells) their HNSW32 graph."""
    graph = 4 * (2 * 32 + 1) + 16 if nlist >= IVF_HNSW_MIN_NLIST else 0
    return n * (4 * d + ID_BYTES) + nlist * (4 * d + graph)


def opq_ivf_pq_bytes(n: int, d: int, nlist: int, m: int, d_out: int) -> int:
    """Codes and ids, coarse centroids, PQ codebooks (256 per sub-space) and the OPQ rotation."""
    return n * (m + ID_BYTES) + 4 * nlist * d_out + 4 * 256 * d_out + 4 * d * d_out


def opq_output_dim(d: int, m: int) -> int:
    """OPQ rotates into d' = the largest multiple of m not above d (PQ splits d' into m parts)."""
    return max(m, (d // m) * m)


def choose_index(num_vectors: int, dim: int, memory_budget: int,
                 flat_max_vectors: int = FLAT_MAX_VECTORS, hnsw_max_vectors: int = HNSW_MAX_VECTORS) -> IndexPlan:
    """The first index type, in the order of the module docstring, that fits the budget."""
    if num_vectors < 1:
        raise UserError("cannot build an index over 0 vectors")
    n, d, budget = num_vectors, dim, memory_budget
    if n < flat_max_vectors and flat_bytes(n, d) <= budget:
        return IndexPlan("flat", "Flat", flat_bytes(n, d), f"{n} vectors < {flat_max_vectors}: exact search")
    if n <= hnsw_max_vectors:
        m_hnsw = min(HNSW_MAX_M, (budget // n - d - 20) // 8)
        while m_hnsw >= HNSW_MIN_M and hnsw_sq8_bytes(n, d, m_hnsw) > budget:
            m_hnsw -= 1
        if m_hnsw >= HNSW_MIN_M:
            return IndexPlan("hnsw_sq8", f"HNSW{m_hnsw},SQ8", hnsw_sq8_bytes(n, d, m_hnsw),
                             f"8-bit codes plus an M={m_hnsw} graph fit the budget",
                             {"M": m_hnsw, "efConstruction": HNSW_EF_CONSTRUCTION})
    nlist = nlist_for(n)
    if ivf_flat_bytes(n, d, nlist) <= budget:
        why = (f"{n} vectors > {hnsw_max_vectors}: a graph over all of them builds too slowly"
               if n > hnsw_max_vectors else "an 8-bit HNSW graph does not fit")
        coarse = f"IVF{nlist}_HNSW32" if nlist >= IVF_HNSW_MIN_NLIST else f"IVF{nlist}"
        return IndexPlan("ivf_flat", f"{coarse},Flat", ivf_flat_bytes(n, d, nlist),
                         f"{why}; uncompressed inverted lists do", {"nlist": nlist})
    return _choose_pq(n, d, budget, nlist)


KINDS = ("flat", "hnsw_sq8", "ivf_flat", "opq_ivf_pq")
IVF_KINDS = ("ivf_flat", "opq_ivf_pq")


def plan_for_kind(kind: str, num_vectors: int, dim: int, memory_budget: int) -> IndexPlan:
    """The plan of `kind` (or "auto": `choose_index`) with the knobs the chooser would give it.
    For tests and benches that need one type at any size: the size thresholds are ignored, the
    budget is not (it still sizes M and the PQ codes, and a kind that cannot fit is refused)."""
    if kind == "auto":
        return choose_index(num_vectors, dim, memory_budget)
    if kind not in KINDS:
        raise UserError(f"unknown index type {kind!r}: use auto or one of {', '.join(KINDS)}")
    if num_vectors < 1:
        raise UserError("cannot build an index over 0 vectors")
    n, d, budget = num_vectors, dim, memory_budget
    if kind == "flat":
        plan = choose_index(n, d, budget, flat_max_vectors=n + 1, hnsw_max_vectors=0) \
            if flat_bytes(n, d) <= budget else None
    elif kind == "hnsw_sq8":
        plan = choose_index(n, d, budget, flat_max_vectors=0, hnsw_max_vectors=n)
    elif kind == "ivf_flat":
        plan = choose_index(n, d, budget, flat_max_vectors=0, hnsw_max_vectors=0)
    else:
        plan = _choose_pq(n, d, budget, nlist_for(n))
    if plan is None or plan.kind != kind:
        raise UserError(f"--index-type {kind} does not fit --memory-budget {budget} bytes for {n} vectors "
                        f"of dim {d}; raise the budget or use --index-type auto")
    return dataclasses.replace(plan, reason=f"--index-type {kind} (the chooser was not asked)")


def _choose_pq(n: int, d: int, budget: int, nlist: int) -> IndexPlan:
    if n < PQ_MIN_VECTORS:
        raise UserError(f"memory budget of {budget} bytes is too small for {n} vectors of dim {d}: "
                        f"needs at least {ivf_flat_bytes(n, d, nlist)} bytes (PQ compression needs "
                        f">= {PQ_MIN_VECTORS} vectors)")
    for m in PQ_BYTES_CHOICES:
        if 2 * m > d:  # at least two dimensions per sub-quantizer
            continue
        d_out = opq_output_dim(d, m)
        size = opq_ivf_pq_bytes(n, d, nlist, m, d_out)
        if size <= budget:
            return IndexPlan("opq_ivf_pq", f"OPQ{m}_{d_out},IVF{nlist},PQ{m}x8", size,
                             f"uncompressed vectors do not fit; {m}-byte PQ codes do",
                             {"nlist": nlist, "pq_bytes": m, "opq_dim": d_out, "opq_iterations": OPQ_ITERATIONS})
    smallest = min(m for m in PQ_BYTES_CHOICES if 2 * m <= d)
    needed = opq_ivf_pq_bytes(n, d, nlist, smallest, opq_output_dim(d, smallest))
    raise UserError(f"memory budget of {budget} bytes is too small for {n} vectors of dim {d}: "
                    f"even {smallest}-byte PQ codes need {needed} bytes")
