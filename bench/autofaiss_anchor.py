"""Runs autofaiss.build_index for bench/index.py, in its own process with the isolated autofaiss
folder on PYTHONPATH; writes its index to OUT_DIR/knn.index and one JSON object (build time,
autofaiss' index_infos, the defaults it ran with, peak RSS) to RESULT.

save_on_disk=False, and the index is written here after the timed build (as bench/index.py writes
ours): autofaiss 2.18.0's own save json-dumps a numpy float32 ('reconstruction error %', float64
under numpy 1's promotion rules) and fails on numpy 2 after writing the index.

    python bench/autofaiss_anchor.py EMBEDDINGS_DIR OUT_DIR MAX_INDEX_MEMORY CURRENT_MEMORY RESULT
"""
import inspect
import json
import os
import sys
import time
from pathlib import Path

# run as a script, bench/ heads sys.path and its files would shadow modules of the same name
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
import autofaiss  # noqa: E402
import faiss  # noqa: E402


def main() -> None:
    embeddings, out, max_memory, current_memory, result = sys.argv[1:6]
    defaults = inspect.signature(autofaiss.build_index).parameters
    rss_before = _status_bytes("VmRSS")
    started = time.perf_counter()
    index, infos = autofaiss.build_index(
        embeddings=embeddings, save_on_disk=False, index_path=None, index_infos_path=None,
        file_format="npy", metric_type="ip", max_index_memory_usage=max_memory,
        current_memory_available=current_memory)
    build_s = time.perf_counter() - started
    peak_rss = _status_bytes("VmHWM")
    if index is None or not infos:
        sys.exit("autofaiss.build_index returned no index (see its log above)")
    faiss.write_index(index, os.path.join(out, "knn.index"))
    report = {
        "version": autofaiss.__version__, "build_s": round(build_s, 3), "index_infos": infos,
        "settings": {"max_index_memory_usage": max_memory, "current_memory_available": current_memory,
                     "metric_type": "ip", "nb_cores": os.cpu_count(),
                     **{name: defaults[name].default for name in
                        ("max_index_query_time_ms", "min_nearest_neighbors_to_retrieve",
                         "make_direct_map", "should_be_memory_mappable")}},
        "rss_before_build_bytes": rss_before,
        "peak_rss_bytes": peak_rss,
    }
    with open(result + ".tmp", "w") as f:
        json.dump(report, f, default=float)
    os.replace(result + ".tmp", result)


def _status_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process; getrusage's ru_maxrss is not used because it
    carries over the parent's RSS at fork across exec."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


if __name__ == "__main__":
    main()
