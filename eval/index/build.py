"""Build a tuned FAISS index from a matrix of embeddings (an array or a memory-mapped .npy).

Steps: normalise (inner product on unit vectors = cosine), choose the index type from size and
memory budget (`choose.py`), train on a random sample when the type needs it, add in chunks, then
tune efSearch / nprobe to the recall target against exact search on one half of a query sample
(`tune.py`), and measure the recall of the tuned index on the other half, which tuning never saw.
Everything that was decided and measured goes into the returned info dict, which the index
folder keeps as index_info.json.

Tuning queries must not be in the index: a query that is one of the indexed vectors is found, with
its neighbours, through its own graph node or cell, which no user query enjoys, so its recall
overstates what new queries get (docs/benchmarks.md, "Tuning queries inside the index"). So without
given queries, a sample of the vectors is held out: the index is built from the rest, tuned and
checked on the held-out rows, and those rows are added last. FAISS ids then follow the order of
addition, which `BuiltIndex.order` records (None when the ids are the row numbers) so that the
caller lines the metadata up with them.

Where the rows are added is a strategy (`add_rows`): `add_locally` here, or Ray tasks that fill
copies of the trained index part by part and merge them back in order (`ray_build.py`). Either
way the trained index, the held-out rows and the ids are the same, so is everything after.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable

import faiss
import numpy as np
from tqdm import tqdm

from eval.index.choose import IndexPlan, choose_index, parse_memory
from eval.index.tune import MARGIN_SIGMAS, exact_search, max_param_value, recall_at_k, tune_search_param

CHUNK_ROWS = 65_536
ADD_BATCH_ROWS = 16_384        # rows per index.add call, on every engine: the same batches give the same codes
TRAIN_POINTS_PER_CELL = 40     # faiss warns below 39 points per k-means centroid
PQ_TRAIN_POINTS = 65_536       # faiss' own cap for OPQ / PQ training samples
SQ_TRAIN_POINTS = 65_536       # the 8-bit quantizer only learns each dimension's min and max


@dataclass
class BuiltIndex:
    index: faiss.Index
    info: dict
    order: np.ndarray | None   # row of `vectors` behind each FAISS id, when it is not the identity


@dataclass
class AddReport:
    """Where the rows were added and how long it took (recorded in index_info.json)."""

    engine: dict = field(default_factory=lambda: {"name": "local"})
    add_s: float = 0.0
    merge_s: float = 0.0     # folding sub-indexes built elsewhere back into the index


# (trained empty index, plan, vectors, sorted row numbers to leave out, show progress) -> report;
# adds the unit rows of `vectors` not in the skip list to the index, in row order (ids 0, 1, ...)
AddRows = Callable[[faiss.Index, IndexPlan, np.ndarray, np.ndarray, bool], AddReport]


def add_batches(rows: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of ADD_BATCH_ROWS over `rows` rows to add. Every engine adds exactly
    these batches (an OPQ rotation is a matrix product whose last bits depend on the batch)."""
    return [(start, min(start + ADD_BATCH_ROWS, rows)) for start in range(0, rows, ADD_BATCH_ROWS)]


def kept_rows(count: int, skip: np.ndarray) -> np.ndarray:
    """Row numbers 0..count-1 without the (sorted) ones in `skip`: the rows to add, in id order."""
    return np.setdiff1d(np.arange(count), skip, assume_unique=True)


def add_locally(index: faiss.Index, plan: IndexPlan, vectors: np.ndarray, skip: np.ndarray,
                progress: bool = True) -> AddReport:
    """Add batch by batch in this process (FAISS spreads each batch over this machine's cores)."""
    started = time.perf_counter()
    keep = kept_rows(len(vectors), skip)
    for start, stop in tqdm(add_batches(len(keep)), desc=f"adding to {plan.factory}", unit="batch",
                            disable=not progress):
        index.add(unit_rows(vectors[keep[start:stop]]))
    return AddReport(add_s=time.perf_counter() - started)


def unit_rows(array: np.ndarray) -> np.ndarray:
    """float32 copy with every row scaled to unit L2 norm (zero rows stay zero)."""
    rows = np.array(array, dtype=np.float32, copy=True)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    rows /= np.maximum(norms, 1e-12)
    return rows


def unit_chunks(vectors: np.ndarray, rows: int = CHUNK_ROWS, skip: np.ndarray | None = None):
    """Unit rows of `vectors` in chunks, leaving out the (sorted) row numbers in `skip`."""
    for start in range(0, len(vectors), rows):
        chunk = vectors[start:start + rows]
        if skip is not None and len(skip):
            inside = skip[(skip >= start) & (skip < start + len(chunk))] - start
            if len(inside):
                chunk = np.delete(np.asarray(chunk), inside, axis=0)
        yield unit_rows(chunk)


def build_index(vectors: np.ndarray, memory_budget: str | int = "4G", recall_target: float = 0.95,
                queries: np.ndarray | None = None, query_source: str = "given queries", k: int = 10,
                num_queries: int = 1000, seed: int = 0,
                plan: IndexPlan | None = None, progress: bool = True,
                add_rows: AddRows = add_locally, lists_file=None) -> BuiltIndex:
    """The index ready to search, its info dict, and its id order. Up to 2 * `num_queries` queries
    are used, half to tune and half to check: rows of `queries`, or (when None) rows held out of
    `vectors` until tuning is done. `add_rows` adds the rows that are not held out."""
    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError(f"expected a non-empty 2-d array of embeddings, got shape {vectors.shape}")
    n, d = vectors.shape
    budget = parse_memory(memory_budget)
    plan = plan or choose_index(n, d, budget)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()

    held = np.empty(0, dtype=np.int64)
    if queries is None:
        query_source = "vectors held out of the index until tuning was done"
        if plan.search_param is not None:
            held = np.sort(rng.choice(n, size=min(n // 2, 2 * num_queries), replace=False))
        query_rows = held if len(held) else np.sort(rng.choice(n, size=min(n, 2 * num_queries), replace=False))
        queries_unit = unit_rows(vectors[query_rows])
    else:
        rows = np.sort(rng.choice(len(queries), size=min(len(queries), 2 * num_queries), replace=False))
        queries_unit = unit_rows(queries[rows])

    index = faiss.index_factory(d, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.kind == "hnsw_sq8":
        index.hnsw.efConstruction = plan.params["efConstruction"]
    if plan.kind == "opq_ivf_pq":
        faiss.downcast_VectorTransform(index.chain.at(0)).niter = plan.params["opq_iterations"]
        # polysemous codes only pay off with Hamming-threshold search, which we do not use
        faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False
    train_s = _train(index, plan, vectors, rng, held)
    adding = contextlib.nullcontext
    if lists_file is not None:   # --on-disk: the lists grow in that file, never whole in memory
        from eval.index.store import attach_lists_on_disk, quiet_c_stdout

        attach_lists_on_disk(index, lists_file)
        adding = quiet_c_stdout   # FAISS printf()s every resize of the file
    with adding():
        added = add_rows(index, plan, vectors, held, progress)
    if index.ntotal != n - len(held):
        raise RuntimeError(f"the add step left {index.ntotal} vectors in the index, not {n - len(held)}")

    tune_started = time.perf_counter()
    k_eff = min(k, index.ntotal)
    _, truth = exact_search(unit_chunks(vectors, skip=held), queries_unit, k_eff)
    tuning = np.zeros(len(queries_unit), dtype=bool)
    tuning[rng.permutation(len(queries_unit))[:(len(queries_unit) + 1) // 2]] = True
    tune_queries, tune_truth = queries_unit[tuning], truth[tuning]
    check_queries, check_truth = queries_unit[~tuning], truth[~tuning]
    tuned = tune_search_param(index, plan.search_param, tune_queries, tune_truth, recall_target,
                              max_param_value(index, plan.search_param))
    held_out = recall_at_k(index.search(check_queries, k_eff)[1], check_truth) if len(check_queries) else None
    tune_s = time.perf_counter() - tune_started
    order = None
    if len(held):
        with adding():
            index.add(queries_unit)  # the held-out rows join the index last
        order = np.concatenate([np.setdiff1d(np.arange(n), held, assume_unique=True), held])

    info = {
        "count": n,
        "dim": d,
        "metric": "inner_product on unit vectors",
        "index": {"kind": plan.kind, "factory": plan.factory, "params": plan.params, "reason": plan.reason,
                  "memory_budget_bytes": budget, "memory_estimate_bytes": plan.memory_bytes},
        "search": {"param": tuned.param, "value": tuned.value},
        "tuning": {"k": k_eff, "recall_target": recall_target, "recall": round(tuned.recall, 4),
                   "recall_lower_bound": round(tuned.recall_lower_bound, 4), "margin_sigmas": MARGIN_SIGMAS,
                   "target_reached": tuned.target_reached, "num_queries": len(tune_queries),
                   "query_source": query_source, "curve": tuned.curve},
        "held_out": {"k": k_eff, "num_queries": len(check_queries), "query_source": query_source,
                     "recall": None if held_out is None else round(held_out, 4),
                     "target_met": held_out is not None and held_out >= recall_target},
        "ids": "row order" if order is None else "rows not held out, then the held-out rows",
        "engine": added.engine,
        "timings_s": {"train": round(train_s, 3), "add": round(added.add_s, 3), "merge": round(added.merge_s, 3),
                      "tune": round(tune_s, 3), "total": round(time.perf_counter() - started, 3)},
    }
    return BuiltIndex(index, info, order)


def _train(index: faiss.Index, plan: IndexPlan, vectors: np.ndarray, rng: np.random.Generator,
           held: np.ndarray) -> float:
    """Train the scalar quantizer's ranges, IVF cells (and OPQ/PQ codebooks) on a random sample of
    the rows not held out; returns seconds spent."""
    if index.is_trained:
        return 0.0
    started = time.perf_counter()
    if plan.kind == "hnsw_sq8":
        wanted = SQ_TRAIN_POINTS
    else:
        wanted = TRAIN_POINTS_PER_CELL * plan.params["nlist"]
    if plan.kind == "opq_ivf_pq":
        wanted = max(wanted, PQ_TRAIN_POINTS)
    candidates = np.setdiff1d(np.arange(len(vectors)), held, assume_unique=True)
    rows = np.sort(rng.choice(candidates, size=min(len(candidates), wanted), replace=False))
    index.train(unit_rows(vectors[rows]))
    return time.perf_counter() - started
