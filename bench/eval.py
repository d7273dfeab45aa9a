"""Evaluation cost: zero-shot + retrieval on synthetic shards, and retrieval metrics at scale.

Part 1 (pipeline): `mmssl prep synthetic` writes N labelled, captioned samples; a random-init
tiny-vit-64 runs `eval.zeroshot.run_zeroshot` and `eval.retrieval.run_retrieval` on them, in
fp32 and bf16. Reported: images/s embedded, and the share of eval wall time spent outside the
model's encoders (loading, decoding, transforms, FAISS scoring, metrics; target < 10%). Anchor
measured in the same run: the bare `encode_image` throughput on an in-memory batch, so
`pipeline_vs_bare_forward` says how close the full pipeline gets to the model alone.

Part 2 (scale): `eval.metrics.retrieval_metrics` on random clustered D-dim vectors (default
100k images x 500k captions x 512, the size it must handle within a few GB): wall time, peak
resident memory, and, as the anchor, a FAISS IndexFlatIP exact top-10 search over the same
vectors timed on a subset of queries and scaled to all of them (both directions).

    python bench/eval.py [--samples 20000] [--batch-size 256] [--workers 2]
                         [--scale-images 100000] [--scale-captions 500000] [--dim 512] [--skip-scale]
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

# Run as `python bench/eval.py`, this file's folder heads sys.path and its name would shadow the
# `eval` package; drop the folder so `import eval...` finds the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def make_shards(folder: Path, samples: int) -> Path:
    subprocess.run(
        [sys.executable, "-m", "mmssl", "prep", "synthetic", "--out", str(folder), "--num-train", "1",
         "--num-val", str(samples), "--num-heldout", "1", "--quiet", "--workers", "2"],
        check=True, stdout=subprocess.DEVNULL,
    )
    return folder / "val"


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


def pipeline(data: Path, precision: str, batch_size: int, workers: int) -> dict:
    from eval.embed import load_model
    from eval.retrieval import run_retrieval
    from eval.zeroshot import run_zeroshot

    loaded = load_model("openclip:tiny-vit-64", precision)
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
    return report


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
    args = parser.parse_args()

    import torch

    report = {"torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_shards(Path(tmp), args.samples)
        for precision in args.precisions:
            report[precision] = pipeline(data, precision, args.batch_size, args.workers)
    if not args.skip_scale:
        report["retrieval_scale"] = scale(args.scale_images, args.scale_captions, args.dim)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
