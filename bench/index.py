"""Index benchmark: the index `mmssl index build` picks for 1M clustered 512-d vectors, against
exact search (`IndexFlatIP`) on the same vectors, in the same run.

Reports build time (train / add / tune), memory (estimate, file size, process RSS growth),
recall@10 on the tuning queries, on the build's own held-out half, and on a third set of queries
the build never saw, and queries/s of both indexes, for a batch of queries and one query at a time
(a service's pattern). The two indexes are timed in alternating rounds so that a burst of load
from other jobs on the box hits both. Target: recall@10 >= 0.95 at >= 20x the exact search's
queries/s. The vectors are written chunk by chunk to a memory-mapped .npy so generation never
holds a second copy. Prints one JSON object.

With `--tuning-queries from-vectors` the build gets no queries and holds a sample of the vectors
out until tuning is done, as `mmssl index build --embeddings` does; the third query set then shows
whether the recall it reports is what new queries get.

    python bench/index.py [--n 1000000] [--dim 512] [--memory-budget 4G] [--workdir DIR]
                          [--tuning-queries given|from-vectors]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# run as `python bench/index.py`, this folder heads sys.path and bench/eval.py would shadow `eval`
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the box is shared; see tests/conftest.py

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

from eval.index.build import build_index, unit_chunks  # noqa: E402
from eval.index.synthetic import clustered_vectors  # noqa: E402
from eval.index.tune import exact_search, recall_at_k  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=4000)
    parser.add_argument("--queries", type=int, default=1000,
                        help="held-out queries for tuning, as many for the build's check, and as many for testing")
    parser.add_argument("--single-queries", type=int, default=50,
                        help="queries timed one at a time per round on exact search (10x as many on the index)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating timing rounds per index")
    parser.add_argument("--memory-budget", default="4G")
    parser.add_argument("--recall-target", type=float, default=0.95)
    parser.add_argument("--workdir", default=None, help="where the .npy goes (default: a temporary folder)")
    parser.add_argument("--tuning-queries", choices=("given", "from-vectors"), default="given",
                        help="given: held-out vectors passed as queries; from-vectors: what `index build "
                             "--embeddings` does (rows held out of the index until tuning is done)")
    args = parser.parse_args()
    process = psutil.Process()
    k = 10

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        started = time.perf_counter()
        total = args.n + 3 * args.queries
        path = Path(work) / "vectors.npy"
        mapped = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(total, args.dim))
        clustered_vectors(total, args.dim, num_clusters=args.clusters, seed=0, out=mapped)
        mapped.flush()
        generate_s = time.perf_counter() - started
        stored = np.load(path, mmap_mode="r")
        vectors = stored[:args.n]
        build_queries = np.array(stored[args.n:args.n + 2 * args.queries])   # held out: never indexed
        test_queries = np.array(stored[args.n + 2 * args.queries:])

        rss_before = process.memory_info().rss
        given = args.tuning_queries == "given"
        built = build_index(vectors, args.memory_budget, args.recall_target,
                            queries=build_queries if given else None,
                            query_source="held-out clustered vectors", k=k,
                            num_queries=args.queries, progress=False)
        index, info = built.index, built.info
        if built.order is not None:  # FAISS ids follow the order of addition: search results map back
            index = _RowIds(index, built.order)
        rss_after_build = process.memory_info().rss
        index_file = Path(work) / "index.faiss"
        faiss.write_index(built.index, str(index_file))
        index_file_bytes = index_file.stat().st_size

        truth_started = time.perf_counter()
        _, truth = exact_search(unit_chunks(vectors), test_queries, k)
        truth_s = time.perf_counter() - truth_started
        exact = faiss.IndexFlatIP(args.dim)
        for chunk in unit_chunks(vectors):
            exact.add(chunk)

        batch = _alternate(lambda ix: _batch_qps(ix, test_queries, k), exact, index, args.rounds)
        single_counts = {id(exact): args.single_queries, id(index): 10 * args.single_queries}
        single = _alternate(lambda ix: _single_qps(ix, test_queries, k, single_counts[id(ix)]), exact, index, args.rounds)
        recall = recall_at_k(index.search(test_queries, k)[1], truth)
        exact_recall = recall_at_k(exact.search(test_queries, k)[1], truth)

    print(json.dumps({
        "bench": "index",
        "n": args.n, "dim": args.dim, "clusters": args.clusters, "k": k,
        "threads": faiss.omp_get_max_threads(), "cpu_count": os.cpu_count(),
        "index": info["index"]["factory"], "reason": info["index"]["reason"],
        "tuning_queries": args.tuning_queries, "query_source": info["tuning"]["query_source"],
        "search_param": info["search"],
        "tuning_recall_at_10": info["tuning"]["recall"],
        "tuning_recall_lower_bound": info["tuning"]["recall_lower_bound"],
        "build_check_recall_at_10": info["held_out"]["recall"],
        "held_out_recall_at_10": round(recall, 4),
        "queries": {"tuning": info["tuning"]["num_queries"], "build_check": info["held_out"]["num_queries"],
                    "held_out": len(test_queries)},
        "exact_recall_at_10_check": round(exact_recall, 4),
        "build_s": info["timings_s"], "generate_s": round(generate_s, 1), "exact_ground_truth_s": round(truth_s, 1),
        "memory": {"budget_bytes": info["index"]["memory_budget_bytes"],
                   "estimate_bytes": info["index"]["memory_estimate_bytes"],
                   "index_file_bytes": index_file_bytes,
                   "rss_growth_during_build_bytes": rss_after_build - rss_before},
        "qps": {"batch": batch, "single": single, "rounds": args.rounds},
        "target": {"recall_at_10": args.recall_target, "speedup": 20},
    }, indent=2))


class _RowIds:
    """An index whose search answers row numbers of the input instead of FAISS ids."""

    def __init__(self, index, order):
        self.index, self.order = index, order

    def search(self, queries, k):
        scores, ids = self.index.search(queries, k)
        return scores, np.where(ids >= 0, self.order[np.maximum(ids, 0)], -1)


def _alternate(measure, exact, index, rounds: int) -> dict:
    """queries/s of both indexes, measured exact, index, exact, index, ... and averaged per index."""
    runs = {"index": [], "exact_flat_ip": []}
    for _ in range(rounds):
        runs["exact_flat_ip"].append(measure(exact))
        runs["index"].append(measure(index))
    qps = {name: float(np.mean(values)) for name, values in runs.items()}
    return {"index": round(qps["index"], 1), "exact_flat_ip": round(qps["exact_flat_ip"], 1),
            "speedup": round(qps["index"] / qps["exact_flat_ip"], 1)}


def _batch_qps(index, queries: np.ndarray, k: int) -> float:
    started = time.perf_counter()
    index.search(queries, k)
    return len(queries) / (time.perf_counter() - started)


def _single_qps(index, queries: np.ndarray, k: int, count: int) -> float:
    started = time.perf_counter()
    for row in queries[:count]:
        index.search(row[None, :], k)
    return count / (time.perf_counter() - started)


if __name__ == "__main__":
    main()
