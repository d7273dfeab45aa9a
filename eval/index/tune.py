"""Exact neighbours, recall@k, and the search-time knob (efSearch / nprobe) tuned to a recall target.

Why tune at build time: the same HNSW or IVF index is fast-and-sloppy or slow-and-exact depending
on one number, and the right number depends on the data. We measure recall@k against exact search
on a query sample and keep the smallest value that reaches the target (recall grows with both
knobs), so serving is as fast as the target allows. "Reaches" means the lower end of a
two-standard-error interval of the sample's mean recall, not the mean itself: the value that just
scrapes the target on one sample falls short on other queries about half the time. The exact side
is computed in chunks of the collection so that it never needs a second full copy of the vectors.
"""
from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

HNSW_EF_SEARCH_MAX = 4096
MARGIN_SIGMAS = 2.0        # standard errors between the sample's mean recall and the target


@dataclass
class TuneResult:
    param: str | None          # efSearch | nprobe | None for exact indexes
    value: int | None
    recall: float              # mean recall@k at that value on the query sample
    recall_lower_bound: float  # recall - MARGIN_SIGMAS standard errors of that mean
    target_reached: bool       # recall_lower_bound >= target
    curve: list                # [[value, recall, recall_lower_bound], ...] in the order measured


def exact_search(chunks, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner products of queries against the concatenation of `chunks` (an iterable of arrays)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_ids = np.empty((len(queries), 0), dtype=np.int64)
    start = 0
    for chunk in chunks:
        chunk = np.ascontiguousarray(chunk, dtype=np.float32)
        scores, ids = faiss.knn(queries, chunk, min(k, len(chunk)), metric=faiss.METRIC_INNER_PRODUCT)
        best_scores = np.concatenate([best_scores, scores], axis=1)
        best_ids = np.concatenate([best_ids, ids + start], axis=1)
        keep = np.argsort(-best_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(best_scores, keep, axis=1)
        best_ids = np.take_along_axis(best_ids, keep, axis=1)
        start += len(chunk)
    return best_scores, best_ids


def per_query_recall(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Fraction of each query's exact top-k found in its approximate top-k."""
    k = truth.shape[1]
    return np.array([len(np.intersect1d(f[:k], t)) / k for f, t in zip(found, truth)])


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of `per_query_recall` (faiss' 'k-recall@k')."""
    return float(per_query_recall(found, truth).mean())


def recall_lower_bound(per_query: np.ndarray, sigmas: float = MARGIN_SIGMAS) -> float:
    """Mean recall minus `sigmas` standard errors of the mean (queries are the independent draws:
    the k hits of one query are not, so a binomial over n*k trials would understate the error)."""
    if len(per_query) < 2:
        return float(per_query.mean())
    return float(per_query.mean() - sigmas * per_query.std(ddof=1) / np.sqrt(len(per_query)))


def set_search_param(index: faiss.Index, param: str | None, value: int | None) -> None:
    """Set efSearch / nprobe through wrappers (OPQ pre-transforms) the way faiss' ParameterSpace does.

    nprobe also widens an HNSW coarse quantizer's efSearch to nprobe: the graph returns only about
    efSearch good cells (FAISS' default 16), so without it every probe beyond those is a poor cell
    and recall stalls below the target however large nprobe grows (0.91 at nprobe = nlist)."""
    if param is None:
        return
    space = faiss.ParameterSpace()
    space.set_index_parameter(index, param, int(value))
    if param == "nprobe" and _hnsw_quantizer(index) is not None:
        space.set_index_parameter(index, "quantizer_efSearch", int(value))


def _hnsw_quantizer(index: faiss.Index):
    """The IVF index's coarse quantizer when it is an HNSW graph (`IVF..._HNSW32`), else None."""
    try:
        quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    except RuntimeError:
        return None
    return quantizer if isinstance(quantizer, faiss.IndexHNSW) else None


def tune_search_param(index: faiss.Index, param: str | None, queries: np.ndarray, truth: np.ndarray,
                      target: float, max_value: int, sigmas: float = MARGIN_SIGMAS) -> TuneResult:
    """Smallest value in [1, max_value] whose recall@k lower bound reaches `target` (or the best one found).

    Doubling from a small start finds a bracket, then bisection finds the smallest passing value;
    both rely on recall growing with the knob, which holds for efSearch and nprobe.
    """
    k = truth.shape[1]
    if param is None:
        per_query = per_query_recall(index.search(queries, k)[1], truth)
        bound = recall_lower_bound(per_query, sigmas)
        return TuneResult(None, None, float(per_query.mean()), bound, bool(bound >= target), [])
    curve: dict[int, tuple[float, float]] = {}

    def measure(value: int) -> float:
        """The lower bound at `value` (mean and bound are kept in `curve`)."""
        if value not in curve:
            set_search_param(index, param, value)
            per_query = per_query_recall(index.search(queries, k)[1], truth)
            curve[value] = (float(per_query.mean()), recall_lower_bound(per_query, sigmas))
        return curve[value][1]

    start = k if param == "efSearch" else 1  # HNSW never looks at fewer than k candidates anyway
    low, value = start - 1, min(max_value, start)
    while measure(value) < target and value < max_value:
        low, value = value, min(max_value, value * 2)
    if curve[value][1] >= target:
        high = value
        while high - low > 1:
            mid = (low + high) // 2
            if measure(mid) >= target:
                high = mid
            else:
                low = mid
        chosen = high
    else:  # unreachable (PQ codes cap recall): the smallest value within 0.5% of the best recall
        best = max(mean for mean, _ in curve.values())
        chosen = min(v for v, (mean, _) in curve.items() if mean >= best - 0.005)
    set_search_param(index, param, chosen)
    mean, bound = curve[chosen]
    return TuneResult(param, chosen, mean, bound, bound >= target,
                      [[v, round(mean, 4), round(low, 4)] for v, (mean, low) in curve.items()])


def max_param_value(index: faiss.Index, param: str | None) -> int:
    """Upper end of the knob's range: nlist for IVF, a generous cap for efSearch."""
    if param == "nprobe":
        return faiss.extract_index_ivf(index).nlist
    return HNSW_EF_SEARCH_MAX
