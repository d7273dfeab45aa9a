"""Evaluation cost: zero-shot + retrieval on synthetic shards, and retrieval metrics at scale.

Part 1 (pipeline): `mmssl prep synthetic` writes N labelled, captioned samples; a random-init
tiny-vit-64 runs `eval.zeroshot.run_zeroshot` and `eval.retrieval.run_retrieval` on them, in
fp32 and bf16. Reported: images/s embedded, and the share of eval wall time spent outside the
model's encoders (loading, decoding, transforms, FAISS scoring, metrics; target < 10%). Anchor
measured in the same run: the bare `encode_image` throughput on an in-memory batch, so
`pipeline_vs_bare_forward` says how close the full pipeline gets to the model alone. The model is
one seeded random-init checkpoint, so the second anchor sees the same weights.

Second anchor, same run (skip with --skip-anchor): CLIP_benchmark 1.6.2's own zero-shot loop
(`zeroshot_classification.evaluate`, through its unmodified CLI in a subprocess with its isolated
install .anchors/clip_benchmark first on PYTHONPATH, see bench/clip_benchmark_zeroshot.py) on the
same checkpoint `mmssl export`ed and loaded by open_clip, and the same shards exported with
`mmssl prep export-clip-benchmark` (same image bytes, 1000-sample shards, read by its own
webdataset loader), at the same batch size, loader workers, precision (fp32: --no_amp; bf16: its
autocast set to bf16) and torch threads. Only the evaluate call is timed (classifier, image
embedding, scoring, metrics), after a warm-up forward; ours over the same span (`run_zeroshot`'s
`seconds`). The two alternate for --anchor-rounds rounds (medians reported);
`ours_vs_clip_benchmark` is ours over theirs in images/s; both top-1 accuracies are reported.

Part 2 (scale): `eval.metrics.retrieval_metrics` on random clustered D-dim vectors (default
100k images x 500k captions x 512, the size it must handle within a few GB): wall time, peak
resident memory, and, as the anchor, a FAISS IndexFlatIP exact top-10 search over the same
vectors timed on a subset of queries and scaled to all of them (both directions).

    python bench/eval.py [--samples 20000] [--batch-size 256] [--workers 2]
                         [--scale-images 100000] [--scale-captions 500000] [--dim 512] [--skip-scale]
                         [--threads 2] [--skip-anchor] [--anchor-rounds 3]
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIP_BENCHMARK = ROOT / ".anchors" / "clip_benchmark"   # .ci/run installs it there, --no-deps
CLIP_BENCHMARK_INSTALL = f"pip install --no-deps --target {CLIP_BENCHMARK} clip_benchmark==1.6.2 pycocoevalcap==1.2"
EXPORT_NAME = "bench-tiny-vit-64"
# Run as `python bench/eval.py`, this file's folder heads sys.path and its name would shadow the
# `eval` package; drop the folder so `import eval...` finds the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def mmssl(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "mmssl", *argv], check=True, stdout=subprocess.DEVNULL)


def make_shards(folder: Path, samples: int) -> Path:
    mmssl("prep", "synthetic", "--out", str(folder), "--num-train", "1", "--num-val", str(samples),
          "--num-heldout", "1", "--num-binding", "0", "--num-labelled", "0", "--shifts", "none", "--quiet",
          "--workers", "2")
    return folder / "val"


def make_checkpoint(folder: Path) -> Path:
    """A random-init tiny-vit-64 (seed 0) as an mmssl checkpoint: one model for every measurement."""
    import torch

    import mmssl as library
    from mmssl.config import ExperimentConfig, ModelConfig, to_dict

    torch.manual_seed(0)
    model_cfg = ModelConfig(name="tiny-vit-64")
    checkpoint = folder / "tiny.pt"
    torch.save({"model": library.create_model(model_cfg).state_dict(),
                "config": to_dict(ExperimentConfig(model=model_cfg)), "heads": {}, "step": 0}, checkpoint)
    return checkpoint


def export_for_clip_benchmark(folder: Path, checkpoint: Path, data: Path, samples: int,
                              workers: int) -> tuple[Path, Path]:
    """(the open_clip export of `checkpoint`, `data` in CLIP_benchmark's webdataset layout): shards
    of 1000 like make_shards', smaller when needed so every loader worker gets one (its wds
    loader refuses a worker without shards)."""
    mmssl("export", "--checkpoint", str(checkpoint), "--out", str(folder / "export"), "--name", EXPORT_NAME)
    shard_size = min(1000, -(-samples // max(workers, 1)))
    mmssl("prep", "export-clip-benchmark", "--data", str(data), "--out", str(folder / "wds"),
          "--shard-size", str(shard_size), "--quiet")
    return folder / "export", folder / "wds"


def clip_benchmark_zeroshot(export: Path, wds: Path, precision: str, batch_size: int, workers: int,
                            threads: int) -> dict:
    """CLIP_benchmark's zero-shot evaluate on the export, timed in its own process."""
    if not (CLIP_BENCHMARK / "clip_benchmark").is_dir():
        raise SystemExit(f"CLIP_benchmark is not installed at {CLIP_BENCHMARK}: run `{CLIP_BENCHMARK_INSTALL}` "
                         f"or pass --skip-anchor")
    out = wds.parent / f"cb_{precision}_timing.json"
    cli_args = ["eval", "--dataset", "wds/bench", "--dataset_root", str(wds), "--task", "zeroshot_classification",
                "--model", EXPORT_NAME, "--pretrained", str(export / "open_clip_model.safetensors"),
                "--batch_size", str(batch_size), "--num_workers", str(workers), "--quiet",
                "--output", str(wds.parent / f"cb_{precision}.json"), *(["--no_amp"] if precision == "fp32" else [])]
    path = os.pathsep.join(filter(None, [str(CLIP_BENCHMARK), os.environ.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parent / "clip_benchmark_zeroshot.py"),
         str(export / f"{EXPORT_NAME}.json"), str(out), str(threads), "1" if precision == "bf16" else "0", *cli_args],
        env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"CLIP_benchmark anchor failed:\n{done.stderr[-3000:]}")
    timing = json.loads(out.read_text())
    return {
        "samples": timing["samples"],
        "images_per_s": round(timing["samples"] / timing["seconds"], 1),
        "acc1": timing["metrics"]["acc1"],
        "acc5": timing["metrics"]["acc5"],
        "loader": "CLIP_benchmark's wds/ dataset and DataLoader, as its CLI builds them",
    }


def against_clip_benchmark(loaded, data: Path, export: Path, wds: Path, precision: str, args) -> dict:
    """Ours (`run_zeroshot`, whole call) and CLIP_benchmark's evaluate in alternating rounds (ours
    first in even rounds, so a burst of load from other jobs hits both); medians of the rounds."""
    from eval.zeroshot import run_zeroshot

    ours, theirs = [], []

    def run_ours():
        outcome = run_zeroshot(loaded, str(data), batch_size=args.batch_size, workers=args.workers)
        ours.append({"images_per_s": len(outcome["embedded"].keys) / outcome["seconds"],
                     "acc1": outcome["result"]["metrics"]["acc1"]})

    def run_theirs():
        theirs.append(clip_benchmark_zeroshot(export, wds, precision, args.batch_size, args.workers, args.threads))

    for round_ in range(args.anchor_rounds):
        for work in (run_ours, run_theirs) if round_ % 2 == 0 else (run_theirs, run_ours):
            work()
    ours_rate = statistics.median(run["images_per_s"] for run in ours)
    theirs_rate = statistics.median(run["images_per_s"] for run in theirs)
    return {
        "clip_benchmark_anchor": {**theirs[0], "images_per_s": round(theirs_rate, 1),
                                  "rounds_images_per_s": [run["images_per_s"] for run in theirs]},
        "ours_zeroshot": {"images_per_s": round(ours_rate, 1), "acc1": ours[0]["acc1"],
                          "rounds_images_per_s": [round(run["images_per_s"], 1) for run in ours]},
        "ours_vs_clip_benchmark": round(ours_rate / theirs_rate, 3),
        "acc1_ours_minus_clip_benchmark": ours[0]["acc1"] - theirs[0]["acc1"],
    }


def bare_forward_images_per_second(loaded, batch_size: int, repeats: int = 5) -> float:
    """The anchor: encode_image alone on one in-memory batch (no data, no metrics)."""
    import torch

    from eval.embed import precision_context

    size = loaded.model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(batch_size, 3, size, size)
    with torch.inference_mode(), precision_context(loaded):
        loaded.model.encode_image(images)
        start = time.perf_counter()
        for _ in range(repeats):
            loaded.model.encode_image(images)
    return batch_size * repeats / (time.perf_counter() - start)


def pipeline(data: Path, checkpoint: Path, precision: str, batch_size: int, workers: int) -> tuple[dict, object]:
    """(the report of one precision, the loaded model)."""
    from eval.embed import load_model
    from eval.retrieval import run_retrieval
    from eval.zeroshot import run_zeroshot

    loaded = load_model(str(checkpoint), precision)
    anchor = bare_forward_images_per_second(loaded, batch_size)
    zeroshot = run_zeroshot(loaded, str(data), batch_size=batch_size, workers=workers)
    retrieval = run_retrieval(loaded, str(data), batch_size=batch_size, workers=workers)
    report = {"bare_forward_images_per_s": round(anchor, 1)}
    for task, outcome in (("zeroshot", zeroshot), ("retrieval", retrieval)):
        embedded = outcome["embedded"]
        images_per_s = len(embedded.keys) / embedded.seconds
        report[task] = {
            "samples": len(embedded.keys),
            "seconds": round(outcome["seconds"], 2),
            "model_seconds": round(outcome["model_seconds"], 2),
            "outside_model_fraction": round(1 - outcome["model_seconds"] / outcome["seconds"], 4),
            "images_per_s": round(images_per_s, 1),
            "pipeline_vs_bare_forward": round(images_per_s / anchor, 3),
            "metrics": outcome["result"]["metrics"],
        }
    return report, loaded


def unit_rows_near(rng, anchors, picks, noise: float, block: int = 50_000):
    """anchors[picks] plus Gaussian noise, L2-normalised, built block-wise (no full-size temporaries)."""
    import numpy as np

    out = np.empty((len(picks), anchors.shape[1]), dtype=np.float32)
    for start in range(0, len(picks), block):
        rows = anchors[picks[start:start + block]]
        rows += noise * rng.standard_normal(rows.shape, dtype=np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        out[start:start + block] = rows
    return out


def scale(num_images: int, num_captions: int, dim: int) -> dict:
    import faiss
    import numpy as np

    from eval.metrics import DEFAULT_CHUNK_BYTES, retrieval_metrics

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, dim), dtype=np.float32)
    images = unit_rows_near(rng, centres, rng.integers(len(centres), size=num_images), 0.5)
    text_to_image = np.concatenate([np.arange(num_images), rng.integers(num_images, size=num_captions - num_images)])
    texts = unit_rows_near(rng, images, text_to_image, 0.1)
    inputs_gb = (images.nbytes + texts.nbytes + text_to_image.nbytes) / 2**30
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    tracemalloc.start()  # numpy reports its allocations to tracemalloc: the metrics' own extra memory
    start = time.perf_counter()
    metrics = retrieval_metrics(images, texts, text_to_image)
    seconds = time.perf_counter() - start
    extra_gb = tracemalloc.get_traced_memory()[1] / 2**30
    tracemalloc.stop()
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    anchor = 0.0  # exact FAISS top-10 search, both directions, timed on 2% of the queries
    for queries, items in ((texts, images), (images, texts)):
        index = faiss.IndexFlatIP(dim)
        index.add(items)
        subset = queries[: max(1, len(queries) // 50)]
        tick = time.perf_counter()
        index.search(subset, 10)
        anchor += (time.perf_counter() - tick) * len(queries) / len(subset)
    return {
        "images": num_images, "captions": num_captions, "dim": dim,
        "seconds": round(seconds, 1),
        "faiss_flat_top10_seconds_est": round(anchor, 1),
        "vs_faiss_flat_top10": round(seconds / anchor, 2),
        "inputs_gb": round(inputs_gb, 2),
        "peak_rss_gb": round(peak_gb, 2),
        "peak_rss_before_metrics_gb": round(rss_before, 2),
        "metrics_extra_memory_gb": round(extra_gb, 2),
        "chunk_budget_mb": DEFAULT_CHUNK_BYTES // 2**20,
        "metrics": {key: round(value, 4) for key, value in metrics.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--scale-images", type=int, default=100_000)
    parser.add_argument("--scale-captions", type=int, default=500_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, ours and CLIP_benchmark's")
    parser.add_argument("--skip-anchor", action="store_true", help="leave out the CLIP_benchmark anchor")
    parser.add_argument("--anchor-rounds", type=int, default=3, help="alternating rounds of ours vs CLIP_benchmark")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    report = {"torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_shards(Path(tmp), args.samples)
        checkpoint = make_checkpoint(Path(tmp))
        if not args.skip_anchor:
            export, wds = export_for_clip_benchmark(Path(tmp), checkpoint, data, args.samples, args.workers)
        for precision in args.precisions:
            report[precision], loaded = pipeline(data, checkpoint, precision, args.batch_size, args.workers)
            if not args.skip_anchor and precision in ("fp32", "bf16"):  # the two CLIP_benchmark can run
                report[precision].update(against_clip_benchmark(loaded, data, export, wds, precision, args))
    if not args.skip_scale:
        report["retrieval_scale"] = scale(args.scale_images, args.scale_captions, args.dim)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
