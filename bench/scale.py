"""Scale-out benchmark: prep, embed and index build on the local engine and on a 2-node Ray cluster
on this machine, the same commands and the same cores; prints one JSON object.

Stages (each run once per engine, local first, outputs compared):
- prep:  `mmssl prep synthetic` of `--images` train scenes (local: `--workers 2`);
- embed: `mmssl embed --modality image,text` of those shards with a 2-step tiny checkpoint;
- index: `mmssl index build --embeddings` of `--vectors` clustered `--dim`-d vectors under a memory
  budget that picks an IVF index (so Ray adds the parts in parallel), plus an `--on-disk` build.

Reported per stage: wall-clock of each engine and their ratio (Ray's overhead; target <= 1.25x),
whether the outputs are identical (shard bytes, embeddings bitwise, index answers), peak RSS of
the driver (the command's process tree) and of the Ray worker processes (largest one and all of
them together), and the index's held-out recall. The Ray cluster is `ray.cluster_utils.Cluster`
with two nodes of one CPU each, started once and joined by every `--engine ray` command.

    python bench/scale.py [--images 50000] [--vectors 1000000] [--dim 128] [--index-type ivf_flat]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# run as `python bench/scale.py`, this folder heads sys.path and bench/eval.py would shadow `eval`
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import psutil  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class PeakMemory:
    """Samples RSS every `every` s while a command runs: its process tree (the driver and any local
    worker processes) and Ray's worker processes (`ray::...` task and actor processes)."""

    def __init__(self, root_pid: int, every: float = 0.2):
        self.root_pid, self.every = root_pid, every
        self.driver = self.driver_anon = self.worker_max = self.workers_total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                root = psutil.Process(self.root_pid)
                tree = [root] + root.children(recursive=True)
                self.driver = max(self.driver, sum(_rss(p) for p in tree))
                self.driver_anon = max(self.driver_anon, sum(_anon(p.pid) for p in tree))
            except psutil.NoSuchProcess:
                pass
            workers = [_rss(p) for p in psutil.process_iter(["name", "cmdline"]) if _is_ray_worker(p)]
            if workers:
                self.worker_max = max(self.worker_max, max(workers))
                self.workers_total = max(self.workers_total, sum(workers))

    def summary(self, with_workers: bool) -> dict:
        gib = 2**30
        driver = {"driver_peak_rss_gib": round(self.driver / gib, 3),
                  "driver_peak_anon_rss_gib": round(self.driver_anon / gib, 3)}
        if not with_workers:   # Ray's idle workers of earlier stages are not this command's
            return driver
        return {**driver, "ray_worker_peak_rss_gib": round(self.worker_max / gib, 3),
                "ray_workers_total_peak_rss_gib": round(self.workers_total / gib, 3)}


def _rss(process: psutil.Process) -> int:
    try:
        return process.memory_info().rss
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0


def _anon(pid: int) -> int:
    """Anonymous resident bytes (heap, not page cache of mapped files) of one process."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _is_ray_worker(process: psutil.Process) -> bool:
    try:
        cmdline = process.info.get("cmdline") or []
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return bool(cmdline) and cmdline[0].startswith("ray::")


def run_mmssl(args: list, env: dict) -> dict:
    """Run `mmssl ARGS` in a subprocess; wall-clock seconds and peak memory."""
    command = [sys.executable, "-m", "mmssl", *args]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    with PeakMemory(process.pid) as memory:
        out, err = process.communicate()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"mmssl {' '.join(args[:2])} failed ({process.returncode}):\n{err[-3000:]}")
    return {"seconds": round(seconds, 2), **memory.summary("--engine" in args),
            "stdout_tail": out.strip().splitlines()[-1:]}


def folder_digest(folder: Path, pattern: str = "**/*") -> dict:
    """relative path -> SHA-256 of every file under `folder` matching `pattern`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.glob(pattern)) if p.is_file()}


def compare(local: dict, ray: dict) -> dict:
    ratio = ray["seconds"] / local["seconds"]
    return {"local": local, "ray": ray, "ray_over_local": round(ratio, 3), "target_met": ratio <= 1.25}


def stage_prep(work: Path, images: int, env: dict, address: str) -> dict:
    common = ["prep", "synthetic", "--num-train", str(images), "--num-val", "256", "--num-heldout", "64",
              "--num-binding", "0", "--num-labelled", "0", "--shifts", "none", "--shard-size", "1000", "--quiet"]
    local = run_mmssl(common + ["--out", str(work / "prep_local"), "--workers", "2"], env)
    ray = run_mmssl(common + ["--out", str(work / "prep_ray"), "--engine", "ray", "--ray-address", address], env)
    same = folder_digest(work / "prep_local") == folder_digest(work / "prep_ray")
    return {**compare(local, ray), "images": images, "identical_bytes": same}


def tiny_checkpoint(work: Path, env: dict) -> Path:
    output = work / "run"
    run_mmssl(["train", "--config", str(ROOT / "configs/tiny.yaml"), f"data.train={work / 'prep_local/train'}",
               f"data.val={work / 'prep_local/val'}", "train.steps=2", "train.batch_size=32", "train.warmup=1",
               "train.save_every=2", "train.log_every=1", f"train.output={output}", "train.precision=fp32"], env)
    return output


def stage_embed(work: Path, checkpoint: Path, env: dict, address: str) -> dict:
    common = ["embed", "--checkpoint", str(checkpoint), "--data", str(work / "prep_local/train"),
              "--modality", "image,text", "--precision", "fp32", "--batch-size", "256"]
    # the local engine embeds with both cores; Ray's two 1-CPU actors with one thread each (bitwise
    # equality needs equal thread counts: tests/test_embed.py holds it; here the rows are compared)
    local = run_mmssl(common + ["--out", str(work / "emb_local"), "--threads", "2"], env)
    ray = run_mmssl(common + ["--out", str(work / "emb_ray"), "--engine", "ray", "--ray-address", address], env)
    diff = max(float(np.abs(np.load(a) - np.load(b)).max())
               for a, b in zip(sorted((work / "emb_local").glob("*_emb/*.npy")),
                               sorted((work / "emb_ray").glob("*_emb/*.npy")), strict=True))
    rows = sum(len(np.load(p, mmap_mode="r")) for p in (work / "emb_local").glob("img_emb/*.npy"))
    return {**compare(local, ray), "rows": rows, "max_abs_difference_2_vs_1_threads": diff,
            "local_samples_per_s": round(rows / local["seconds"], 1),
            "ray_samples_per_s": round(rows / ray["seconds"], 1)}


def stage_index(work: Path, vectors: int, dim: int, budget: str, kind: str, env: dict, address: str) -> dict:
    from eval.index.synthetic import clustered_vectors

    queries = 1000
    path = work / "vectors.npy"
    mapped = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(vectors + queries, dim))
    clustered_vectors(vectors + queries, dim, num_clusters=4000, seed=0, out=mapped)
    mapped.flush()
    del mapped
    stored = np.load(path, mmap_mode="r")
    np.save(work / "indexed.npy", stored[:vectors])
    test = np.array(stored[vectors:])
    common = ["index", "build", "--embeddings", str(work / "indexed.npy"), "--memory-budget", budget,
              "--index-type", kind]
    local = run_mmssl(common + ["--out", str(work / "idx_local")], env)
    ray = run_mmssl(common + ["--out", str(work / "idx_ray"), "--engine", "ray", "--ray-address", address], env)
    on_disk = run_mmssl(common + ["--out", str(work / "idx_disk"), "--on-disk"], env)
    answers = {name: _search(work / name, test) for name in ("idx_local", "idx_ray", "idx_disk")}
    info = json.loads((work / "idx_local/index_info.json").read_text())
    ray_info = json.loads((work / "idx_ray/index_info.json").read_text())
    truth = _exact(stored[:vectors], test)
    return {**compare(local, ray), "vectors": vectors, "dim": dim, "memory_budget": budget,
            "factory": info["index"]["factory"], "search": info["search"],
            "held_out_recall_at_10": info["held_out"]["recall"],
            "test_recall_at_10_local": _recall(answers["idx_local"][1], truth),
            "test_recall_at_10_on_disk": _recall(answers["idx_disk"][1], truth),
            "ray_engine": ray_info.get("engine"),
            "ray_answers_identical": all(np.array_equal(a, b) for a, b in zip(answers["idx_local"], answers["idx_ray"])),
            "on_disk_answers_identical": all(np.array_equal(a, b)
                                             for a, b in zip(answers["idx_local"], answers["idx_disk"])),
            "on_disk": on_disk, "files_mib": {name: _sizes(work / name) for name in ("idx_local", "idx_disk")},
            "serve_rss_mib": {name: _load_rss(work / name) for name in ("idx_local", "idx_disk")}}


def _search(folder: Path, queries: np.ndarray):
    """Scores and the row numbers of the hits (the keys: FAISS ids put held-out rows last)."""
    from eval.index.store import load_index_folder

    loaded = load_index_folder(folder)
    scores, ids = loaded.index.search(np.ascontiguousarray(queries), 10)
    rows = np.array([int(key) for key in loaded.metadata.keys], dtype=np.int64)
    return scores, np.where(ids >= 0, rows[np.maximum(ids, 0)], -1)


def _exact(vectors, queries):
    from eval.index.build import unit_chunks
    from eval.index.tune import exact_search

    return exact_search(unit_chunks(vectors), np.ascontiguousarray(queries), 10)[1]


def _recall(found, truth) -> float:
    from eval.index.tune import recall_at_k

    return round(recall_at_k(found, truth), 4)


def _sizes(folder: Path) -> dict:
    return {p.name: round(p.stat().st_size / 2**20, 1) for p in sorted(folder.iterdir()) if p.is_file()}


def _load_rss(folder: Path) -> dict:
    """RSS growth (MiB: anonymous, file-backed, shared) of a fresh process that loads the index
    folder and answers 100 queries: what a search service holds beyond its model. File-backed
    pages (on-disk lists read through mmap) are page cache the kernel may drop."""
    code = ("import json,numpy as np\nfrom eval.index.store import load_index_folder\n"
            "def rss():\n"
            "    f=dict(l.split(':',1) for l in open('/proc/self/status') if l.startswith('Rss'))\n"
            "    return {k:int(v.split()[0])/1024 for k,v in f.items()}\n"
            "before=rss()\n"
            f"f=load_index_folder({str(folder)!r})\n"
            "q=np.random.default_rng(1).standard_normal((100,f.info['dim'])).astype('float32')\n"
            "f.index.search(q,10)\nafter=rss()\n"
            "print(json.dumps({k:round(after[k]-before[k],1) for k in after}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000, help="synthetic scenes to prep and embed")
    parser.add_argument("--vectors", type=int, default=1_000_000, help="vectors to index")
    parser.add_argument("--dim", type=int, default=128, help="their dimension (tiny-vit-64 embeds into 128)")
    parser.add_argument("--memory-budget", default="1G")
    parser.add_argument("--index-type", default="ivf_flat",
                        help="an IVF kind, whose parts Ray adds in parallel (auto would pick an HNSW graph here)")
    parser.add_argument("--stages", default="prep,embed,index")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    from ray.cluster_utils import Cluster

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
    stages = set(args.stages.split(","))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    result = {"machine": f"{os.cpu_count()} cores", "ray_cluster": "ray.cluster_utils.Cluster, 2 nodes x 1 CPU"}
    try:
        with tempfile.TemporaryDirectory(dir=args.workdir) as work:
            work = Path(work)
            if stages & {"prep", "embed"}:
                result["prep"] = stage_prep(work, args.images, env, cluster.address)
                print(json.dumps({"prep": result["prep"]}), file=sys.stderr, flush=True)
            if "embed" in stages:
                checkpoint = tiny_checkpoint(work, env)
                result["embed"] = stage_embed(work, checkpoint, env, cluster.address)
                print(json.dumps({"embed": result["embed"]}), file=sys.stderr, flush=True)
            if "index" in stages:
                result["index"] = stage_index(work, args.vectors, args.dim, args.memory_budget, args.index_type,
                                              env, cluster.address)
    finally:
        cluster.shutdown()
    timed = [result[s] for s in ("prep", "embed", "index") if s in result]
    if timed:
        local = sum(s["local"]["seconds"] for s in timed)
        ray = sum(s["ray"]["seconds"] for s in timed)
        result["total"] = {"local_s": round(local, 1), "ray_s": round(ray, 1), "ray_over_local": round(ray / local, 3)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
