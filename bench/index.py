"""Index benchmark: the index `mmssl index build` picks for 1M clustered 512-d vectors, against
exact search (`IndexFlatIP`) on the same vectors, in the same run.

Reports build time (train / add / tune), memory (estimate, file size, process RSS growth),
recall@10 on held-out queries that were not used for tuning, and queries/s of both indexes, for a
batch of queries and one query at a time (a service's pattern). Target: recall@10 >= 0.95 at
>= 20x the exact search's queries/s. The vectors are written chunk by chunk to a memory-mapped
.npy so generation never holds a second copy. Prints one JSON object.

    python bench/index.py [--n 1000000] [--dim 512] [--memory-budget 4G] [--workdir DIR]
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
    parser.add_argument("--queries", type=int, default=1000, help="held-out queries for tuning, and as many for testing")
    parser.add_argument("--single-queries", type=int, default=100, help="queries timed one at a time")
    parser.add_argument("--memory-budget", default="4G")
    parser.add_argument("--recall-target", type=float, default=0.95)
    parser.add_argument("--workdir", default=None, help="where the .npy goes (default: a temporary folder)")
    args = parser.parse_args()
    process = psutil.Process()
    k = 10

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        started = time.perf_counter()
        total = args.n + 2 * args.queries
        path = Path(work) / "vectors.npy"
        mapped = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(total, args.dim))
        clustered_vectors(total, args.dim, num_clusters=args.clusters, seed=0, out=mapped)
        mapped.flush()
        generate_s = time.perf_counter() - started
        stored = np.load(path, mmap_mode="r")
        vectors = stored[:args.n]
        tune_queries = np.array(stored[args.n:args.n + args.queries])   # held out: never indexed
        test_queries = np.array(stored[args.n + args.queries:])

        rss_before = process.memory_info().rss
        index, info = build_index(vectors, args.memory_budget, args.recall_target, queries=tune_queries,
                                  query_source="held-out clustered vectors", k=k,
                                  num_queries=args.queries, progress=False)
        rss_after_build = process.memory_info().rss
        index_file = Path(work) / "index.faiss"
        faiss.write_index(index, str(index_file))
        index_file_bytes = index_file.stat().st_size

        truth_started = time.perf_counter()
        _, truth = exact_search(unit_chunks(vectors), test_queries, k)
        truth_s = time.perf_counter() - truth_started
        exact = faiss.IndexFlatIP(args.dim)
        for chunk in unit_chunks(vectors):
            exact.add(chunk)

        approx_batch = _batch_qps(index, test_queries, k)
        exact_batch = _batch_qps(exact, test_queries, k)
        approx_single = _single_qps(index, test_queries[:args.single_queries * 10], k)
        exact_single = _single_qps(exact, test_queries[:args.single_queries], k)
        recall = recall_at_k(index.search(test_queries, k)[1], truth)
        exact_recall = recall_at_k(exact.search(test_queries, k)[1], truth)

    print(json.dumps({
        "bench": "index",
        "n": args.n, "dim": args.dim, "clusters": args.clusters, "k": k,
        "threads": faiss.omp_get_max_threads(), "cpu_count": os.cpu_count(),
        "index": info["index"]["factory"], "reason": info["index"]["reason"],
        "search_param": info["search"],
        "tuning_recall_at_10": info["tuning"]["recall"],
        "held_out_recall_at_10": round(recall, 4),
        "exact_recall_at_10_check": round(exact_recall, 4),
        "build_s": info["timings_s"], "generate_s": round(generate_s, 1), "exact_ground_truth_s": round(truth_s, 1),
        "memory": {"budget_bytes": info["index"]["memory_budget_bytes"],
                   "estimate_bytes": info["index"]["memory_estimate_bytes"],
                   "index_file_bytes": index_file_bytes,
                   "rss_growth_during_build_bytes": rss_after_build - rss_before},
        "qps": {"batch": {"index": round(approx_batch, 1), "exact_flat_ip": round(exact_batch, 1),
                          "speedup": round(approx_batch / exact_batch, 1)},
                "single": {"index": round(approx_single, 1), "exact_flat_ip": round(exact_single, 1),
                           "speedup": round(approx_single / exact_single, 1)}},
        "target": {"recall_at_10": args.recall_target, "speedup": 20},
    }, indent=2))


def _batch_qps(index, queries: np.ndarray, k: int) -> float:
    started = time.perf_counter()
    index.search(queries, k)
    return len(queries) / (time.perf_counter() - started)


def _single_qps(index, queries: np.ndarray, k: int) -> float:
    started = time.perf_counter()
    for row in queries:
        index.search(row[None, :], k)
    return len(queries) / (time.perf_counter() - started)


if __name__ == "__main__":
    main()
