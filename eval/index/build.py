"""Build a tuned FAISS index from a matrix of embeddings (an array or a memory-mapped .npy).

Steps: normalise (inner product on unit vectors = cosine), choose the index type from size and
memory budget (`choose.py`), train on a random sample when the type needs it, add in chunks, then
tune efSearch / nprobe to the recall target against exact search on one half of a query sample
(`tune.py`), and measure the recall of the tuned index on the other half, which tuning never saw.
Everything that was decided and measured goes into the returned info dict, which the index
folder keeps as index_info.json.
"""
from __future__ import annotations

import time

import faiss
import numpy as np
from tqdm import tqdm

from eval.index.choose import IndexPlan, choose_index, parse_memory
from eval.index.tune import MARGIN_SIGMAS, exact_search, max_param_value, recall_at_k, tune_search_param

CHUNK_ROWS = 65_536
TRAIN_POINTS_PER_CELL = 40     # faiss warns below 39 points per k-means centroid
PQ_TRAIN_POINTS = 65_536       # faiss' own cap for OPQ / PQ training samples
SQ_TRAIN_POINTS = 65_536       # the 8-bit quantizer only learns each dimension's min and max


def unit_rows(array: np.ndarray) -> np.ndarray:
    """float32 copy with every row scaled to unit L2 norm (zero rows stay zero)."""
    rows = np.array(array, dtype=np.float32, copy=True)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    rows /= np.maximum(norms, 1e-12)
    return rows


def unit_chunks(vectors: np.ndarray, rows: int = CHUNK_ROWS):
    for start in range(0, len(vectors), rows):
        yield unit_rows(vectors[start:start + rows])


def build_index(vectors: np.ndarray, memory_budget: str | int = "4G", recall_target: float = 0.95,
                queries: np.ndarray | None = None, query_source: str = "given queries", k: int = 10,
                num_queries: int = 1000, seed: int = 0,
                plan: IndexPlan | None = None, progress: bool = True) -> tuple[faiss.Index, dict]:
    """(index ready to search, info dict). `queries` default to a sample of the vectors themselves;
    up to 2 * `num_queries` of them are used, half to tune and half to check."""
    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError(f"expected a non-empty 2-d array of embeddings, got shape {vectors.shape}")
    n, d = vectors.shape
    budget = parse_memory(memory_budget)
    plan = plan or choose_index(n, d, budget)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()

    index = faiss.index_factory(d, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.kind == "hnsw_sq8":
        index.hnsw.efConstruction = plan.params["efConstruction"]
    if plan.kind == "opq_ivf_pq":
        faiss.downcast_VectorTransform(index.chain.at(0)).niter = plan.params["opq_iterations"]
        # polysemous codes only pay off with Hamming-threshold search, which we do not use
        faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False
    train_s = _train(index, plan, vectors, rng)
    add_started = time.perf_counter()
    for chunk in tqdm(unit_chunks(vectors), total=-(-n // CHUNK_ROWS), desc=f"adding to {plan.factory}",
                      unit="chunk", disable=not progress):
        index.add(chunk)
    add_s = time.perf_counter() - add_started

    tune_started = time.perf_counter()
    if queries is None:
        query_source = "sample of the indexed vectors"
        queries = vectors
    rows = np.sort(rng.choice(len(queries), size=min(len(queries), 2 * num_queries), replace=False))
    queries = unit_rows(queries[rows])
    k_eff = min(k, n)
    _, truth = exact_search(unit_chunks(vectors), queries, k_eff)
    tuning = np.zeros(len(rows), dtype=bool)
    tuning[rng.permutation(len(rows))[:(len(rows) + 1) // 2]] = True
    tune_queries, tune_truth = queries[tuning], truth[tuning]
    check_queries, check_truth = queries[~tuning], truth[~tuning]
    tuned = tune_search_param(index, plan.search_param, tune_queries, tune_truth, recall_target,
                              max_param_value(index, plan.search_param))
    held_out = recall_at_k(index.search(check_queries, k_eff)[1], check_truth) if len(check_queries) else None
    tune_s = time.perf_counter() - tune_started

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
        "timings_s": {"train": round(train_s, 3), "add": round(add_s, 3), "tune": round(tune_s, 3),
                      "total": round(time.perf_counter() - started, 3)},
    }
    return index, info


def _train(index: faiss.Index, plan: IndexPlan, vectors: np.ndarray, rng: np.random.Generator) -> float:
    """Train the scalar quantizer's ranges, IVF cells (and OPQ/PQ codebooks) on a random sample;
    returns seconds spent."""
    if index.is_trained:
        return 0.0
    started = time.perf_counter()
    if plan.kind == "hnsw_sq8":
        wanted = SQ_TRAIN_POINTS
    else:
        wanted = TRAIN_POINTS_PER_CELL * plan.params["nlist"]
    if plan.kind == "opq_ivf_pq":
        wanted = max(wanted, PQ_TRAIN_POINTS)
    n = len(vectors)
    rows = np.sort(rng.choice(n, size=min(n, wanted), replace=False))
    index.train(unit_rows(vectors[rows]))
    return time.perf_counter() - started
