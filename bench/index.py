"""Index benchmark: the index `mmssl index build` picks for 1M clustered 512-d vectors, against
exact search (`IndexFlatIP`) on the same vectors, in the same run.

Reports build time (train / add / tune), memory (estimate, file size, process RSS growth),
recall@10 on the tuning queries, on the build's own held-out half, and on a third set of queries
the build never saw, and queries/s of both indexes, for a batch of queries and one query at a time
(a service's pattern). The two indexes are timed in alternating rounds so that a burst of load
from other jobs on the box hits both. Target: recall@10 >= 0.95 at >= 20x the exact search's
queries/s. The vectors are written chunk by chunk to a memory-mapped .npy so generation never
holds a second copy. Prints one JSON object.

Unless `--no-autofaiss`, autofaiss (the anchor: `autofaiss.build_index`, pinned in
AUTOFAISS_PACKAGES, installed with --no-deps into bench/.anchor_autofaiss on first use and run in a
subprocess, bench/autofaiss_anchor.py) builds on the same indexed rows with the same memory budget
and its own default speed target (it has no recall target); its index is searched here on the same
held-out queries, ground truth and alternating timing rounds. Target: at equal memory, equal or
better held-out recall in >= 2x less build time than autofaiss.

With `--tuning-queries from-vectors` the build gets no queries and holds a sample of the vectors
out until tuning is done, as `mmssl index build --embeddings` does; the third query set then shows
whether the recall it reports is what new queries get.

    python bench/index.py [--n 1000000] [--dim 512] [--memory-budget 4G] [--workdir DIR]
                          [--tuning-queries given|from-vectors] [--no-autofaiss]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
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
from eval.index.choose import parse_memory  # noqa: E402
from eval.index.synthetic import clustered_vectors  # noqa: E402
from eval.index.tune import exact_search, recall_at_k  # noqa: E402

HERE = Path(__file__).resolve().parent
AUTOFAISS_DIR = HERE / ".anchor_autofaiss"
# autofaiss and the pure-python packages it imports that .venv lacks; faiss-cpu, numpy, pandas,
# pyarrow, fsspec and tqdm come from .venv (--no-deps: autofaiss' numpy<2 / pandas<3 pins are
# metadata only, and 2.18.0 imports and runs with .venv's numpy 2 / pandas 3 / faiss 1.15)
AUTOFAISS_PACKAGES = ["autofaiss==2.18.0", "embedding_reader==1.8.1", "fire==0.6.0", "termcolor==3.3.0",
                      "six==1.17.0"]
AUTOFAISS_MEMORY_AVAILABLE = "16G"   # what autofaiss may use while building (not the index budget)


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
    parser.add_argument("--no-autofaiss", action="store_true", help="skip the autofaiss anchor")
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
        indexes = {"exact_flat_ip": exact, "index": index}
        if not args.no_autofaiss:
            anchor, indexes["autofaiss"] = _autofaiss(vectors, Path(work), args.memory_budget)

        batch = _alternate(lambda name, ix: _batch_qps(ix, test_queries, k), indexes, args.rounds)
        single_counts = {name: args.single_queries * (1 if name == "exact_flat_ip" else 10) for name in indexes}
        single = _alternate(lambda name, ix: _single_qps(ix, test_queries, k, single_counts[name]), indexes,
                            args.rounds)
        recall = recall_at_k(index.search(test_queries, k)[1], truth)
        exact_recall = recall_at_k(exact.search(test_queries, k)[1], truth)
        if not args.no_autofaiss:
            anchor["held_out_recall_at_10"] = round(recall_at_k(indexes["autofaiss"].search(test_queries, k)[1],
                                                                truth), 4)

    result = {
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
        "qps": {"batch": _versus_exact(batch, "index"), "single": _versus_exact(single, "index"),
                "rounds": args.rounds},
        "target": {"recall_at_10": args.recall_target, "speedup": 20},
    }
    if not args.no_autofaiss:
        anchor["qps"] = {"batch": _versus_exact(batch, "autofaiss"), "single": _versus_exact(single, "autofaiss")}
        result["autofaiss"] = anchor
        result["versus_autofaiss"] = {
            "build_time_ratio": round(anchor["build_s"] / info["timings_s"]["total"], 2),
            "held_out_recall_difference": round(recall - anchor["held_out_recall_at_10"], 4),
            "index_file_size_ratio": round(index_file_bytes / anchor["index_file_bytes"], 3),
            "batch_qps_ratio": round(batch["index"] / batch["autofaiss"], 2),
            "single_qps_ratio": round(single["index"] / single["autofaiss"], 2),
            "target": "build_time_ratio >= 2 and held_out_recall_difference >= 0 at index_file_size_ratio <= 1",
        }
    print(json.dumps(result, indent=2))


def _autofaiss(vectors: np.ndarray, work: Path, memory_budget: str) -> tuple[dict, faiss.Index]:
    """autofaiss' build on `vectors` (a folder holding exactly those rows as one .npy), run in a
    subprocess; its report and its index, loaded here with the search parameters it chose."""
    _ensure_autofaiss()
    folder, out = work / "autofaiss_in", work / "autofaiss_out"
    folder.mkdir()
    out.mkdir()
    copy = np.lib.format.open_memmap(folder / "vectors.npy", mode="w+", dtype=np.float32, shape=vectors.shape)
    for start in range(0, len(vectors), 65536):  # our rows as they are: unit rows, like the ground truth's
        copy[start:start + 65536] = vectors[start:start + 65536]
    copy.flush()
    del copy
    budget = f"{parse_memory(memory_budget)}B"   # autofaiss' parser reads bytes with a B unit exactly
    report_path = work / "autofaiss.json"
    started = time.perf_counter()
    subprocess.run([sys.executable, str(HERE / "autofaiss_anchor.py"), str(folder), str(out), budget,
                    AUTOFAISS_MEMORY_AVAILABLE, str(report_path)],
                   env={**os.environ, "PYTHONPATH": str(AUTOFAISS_DIR)}, stdout=sys.stderr, check=True)
    runner_s = time.perf_counter() - started
    report = json.loads(report_path.read_text())
    infos = report["index_infos"]
    index_file = out / "knn.index"
    index = faiss.read_index(str(index_file))
    if infos["index_param"]:
        faiss.ParameterSpace().set_index_parameters(index, infos["index_param"])
    return {
        "version": report["version"], "factory": infos["index_key"], "index_param": infos["index_param"],
        "settings": report["settings"], "build_s": report["build_s"], "runner_wall_s": round(runner_s, 1),
        "index_file_bytes": index_file.stat().st_size,
        "runner_peak_rss_bytes": report["peak_rss_bytes"],
        "runner_rss_growth_during_build_bytes": report["peak_rss_bytes"] - report["rss_before_build_bytes"],
        "own_metrics": {key: infos[key] for key in ("avg_search_speed_ms", "99p_search_speed_ms",
                                                    "reconstruction error %", "size in bytes") if key in infos},
    }, index


def _ensure_autofaiss() -> None:
    """Installs AUTOFAISS_PACKAGES (no dependencies) into AUTOFAISS_DIR once, staged then renamed."""
    if (AUTOFAISS_DIR / "autofaiss" / "__init__.py").exists():
        return
    staging = AUTOFAISS_DIR.with_name(f"{AUTOFAISS_DIR.name}.tmp-{os.getpid()}")
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(staging),
                        *AUTOFAISS_PACKAGES], check=True, stdout=sys.stderr)
        os.replace(staging, AUTOFAISS_DIR)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class _RowIds:
    """An index whose search answers row numbers of the input instead of FAISS ids."""

    def __init__(self, index, order):
        self.index, self.order = index, order

    def search(self, queries, k):
        scores, ids = self.index.search(queries, k)
        return scores, np.where(ids >= 0, self.order[np.maximum(ids, 0)], -1)


def _alternate(measure, indexes: dict, rounds: int) -> dict:
    """queries/s of each index, measured in turn (a, b, c, a, b, c, ...) and averaged per index;
    `measure` takes the index's name and the index."""
    runs = {name: [] for name in indexes}
    for _ in range(rounds):
        for name, index in indexes.items():
            runs[name].append(measure(name, index))
    return {name: round(float(np.mean(values)), 1) for name, values in runs.items()}


def _versus_exact(qps: dict, name: str) -> dict:
    return {name: qps[name], "exact_flat_ip": qps["exact_flat_ip"],
            "speedup": round(qps[name] / qps["exact_flat_ip"], 1)}


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
