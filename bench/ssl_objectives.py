"""Self-supervised objectives side by side on the synthetic world (issue 12's benchmark).

Image-text variants train the tiny config's model (tiny-vit-64, AdamW, fp32, seed 0) from the
same seed on the same shards. At batch 128 each variant gets the same wall-clock budget: a short
calibration measures its seconds per step and it trains for budget / that many steps (its
warmup-cosine schedule completes). The batch-32 variants instead see the same number of samples
as `clip-b128` (4x its steps), which answers the question the queue is for: does a 4096-key queue
let batch 32 reach what batch 128 reaches at equal samples seen? Each variant is scored zero-shot
on `val` and `heldout` (top-1 over the 48 classes), by retrieval R@1 / R@10 on `val`, and by a
linear probe (`val` of a second world drawn with another seed trains it, this world's `val` tests
it). Training runs as a `mmssl train` subprocess whose peak RSS is sampled; samples/s comes from
its metrics.jsonl (first window dropped).

The queue's cost per step is measured apart, in one process, by alternating calibrations of
`clip-b128` and `queue-b128` (`--overhead-rounds`), since on a shared machine only same-run
ratios mean much. Variants whose objective is not built yet (see `mmssl.objective.BUILT`) are
listed as skipped.

Image-only variants (`--image-only`: SimCLR, MoCo v2 with a 4096-key queue, MAE inpainting
alone, and the untrained tower) train the image tower alone on the same images for the same budget and are scored by the
linear probe and a 20-NN classifier (`mmssl eval knn`) on the 48 labels.

usage: python bench/ssl_objectives.py [--budget-s 300] [--variants clip-b128,queue-b32,...] [--image-only simclr,moco,mae,random]
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
_spec = importlib.util.spec_from_file_location("aux_heads", REPO / "bench" / "aux_heads.py")
aux_heads = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(aux_heads)      # its world, overrides and calibration, shared

QUEUE = ["loss.queue_size=4096", "loss.momentum=0.995"]
# name -> (batch size, overrides on top of configs/tiny.yaml, what it needs built)
VARIANTS = {
    "clip-b128": (128, [], None),
    "clip-b32": (32, [], None),
    "queue-b32": (32, QUEUE, "loss.queue_size"),
    "queue-b128": (128, QUEUE, "loss.queue_size"),
    "queue-distill-b128": (128, QUEUE + ["loss.distill_alpha=0.4"], "loss.distill_alpha"),
    "slip-b128": (128, ["loss.simclr_weight=1.0"], "loss.simclr_weight"),
    "siglip-b128": (128, ["loss.kind=siglip"], None),
}
ANCHOR = "clip-b128"
# image-only: the image tower alone on the same shards' images (captions unused), batch 128, the same budget
IMAGE_ONLY = {
    "simclr": ["loss.kind=simclr"],
    "moco": ["loss.kind=moco", "loss.queue_size=4096"],   # MoCo's 65536 would outnumber the 20k images
    "mae": ["loss.kind=mae"],                             # inpainting alone (75% of patches hidden)
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=300.0, help="training seconds per batch-128 variant")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="image-text variants")
    parser.add_argument("--image-only", default=",".join(IMAGE_ONLY) + ",random",
                        help="image-only variants (random: the untrained tower), '' for none")
    parser.add_argument("--overhead-rounds", type=int, default=3, help="alternating calibration pairs for the queue cost")
    parser.add_argument("--num-train", type=int, default=20000)
    parser.add_argument("--num-val", type=int, default=960)
    parser.add_argument("--work", default=str(REPO / "bench" / "results" / "ssl_objectives"))
    args = parser.parse_args()
    names = aux_heads.pick_variants(parser, args.variants, VARIANTS)
    image_only = aux_heads.pick_variants(parser, args.image_only, [*IMAGE_ONLY, "random"])
    if ANCHOR not in names and any(VARIANTS[name][0] == 32 for name in names):
        names.insert(0, ANCHOR)       # the batch-32 variants see the samples it saw

    import torch

    from mmssl.objective import BUILT

    torch.set_num_threads(aux_heads.THREADS)
    work = Path(args.work)
    world = aux_heads.synthetic_world(work / "world", args.num_train, args.num_val)
    probe_world = probe_train_world(work / "probe_world", args.num_val)
    result = {"model": "tiny-vit-64", "budget_s": args.budget_s, "threads": aux_heads.THREADS,
              "cpu_count": os.cpu_count(), "load_avg_1m_start": os.getloadavg()[0], "num_train": args.num_train,
              "seed": 0, "variants": {}, "skipped": {}}
    result["queue_overhead"] = (queue_overhead(world, work, args.overhead_rounds)
                                if args.overhead_rounds and "loss.queue_size" in BUILT else None)
    print(f"[ssl_objectives] queue overhead: {json.dumps(result['queue_overhead'])}", file=sys.stderr, flush=True)
    anchor_steps = None
    for name in names:
        batch_size, extra, needs = VARIANTS[name]
        if needs is not None and needs not in BUILT:
            result["skipped"][name] = f"{needs} is not built yet"
            continue
        overrides = aux_heads.base_overrides(world, work / name, batch_size) + extra
        seconds_per_step = aux_heads.calibrate(overrides, 6)
        if batch_size == 32:
            steps = 4 * anchor_steps                       # the samples clip-b128 saw
        else:
            steps = max(10, int(args.budget_s / seconds_per_step))
        if name == ANCHOR:
            anchor_steps = steps
        run = train_subprocess(overrides, steps)
        run.update(evaluate(Path(run.pop("checkpoint")), world, probe_world))
        run.update(calibrated_s_per_step=seconds_per_step, batch_size=batch_size, samples_seen=steps * batch_size)
        result["variants"][name] = run
        print(f"[ssl_objectives] {name}: {json.dumps(run)}", file=sys.stderr, flush=True)
    result["image_only"] = {}
    for name in image_only:
        if name == "random":
            run = {"steps": 0, "checkpoint": "openclip:tiny-vit-64"}   # the same architecture at seed 0, untrained
        else:
            overrides = aux_heads.base_overrides(world, work / name, 128) + IMAGE_ONLY[name]
            seconds_per_step = aux_heads.calibrate(overrides, 6)
            run = train_subprocess(overrides, max(10, int(args.budget_s / seconds_per_step)))
            run["calibrated_s_per_step"] = seconds_per_step
        run.update(evaluate_image_only(run.pop("checkpoint"), world, probe_world))
        result["image_only"][name] = run
        print(f"[ssl_objectives] image-only {name}: {json.dumps(run)}", file=sys.stderr, flush=True)
    result["load_avg_1m_end"] = os.getloadavg()[0]
    print(json.dumps(result, indent=1))


def probe_train_world(directory: Path, num_val: int) -> Path:
    """A second synthetic world (seed 1): its `val` trains the linear probe, so the probe is
    tested on images it never fitted."""
    from data_prep.synthetic import generate

    manifest = directory / "val" / "manifest.json"
    if not manifest.is_file() or json.loads(manifest.read_text())["num_samples"] != num_val:
        generate(directory, num_train=64, num_val=num_val, image_size=64, seed=1, workers=2, overwrite=True,
                 quiet=True)
    return directory


def queue_overhead(world: Path, work: Path, rounds: int) -> dict:
    """Seconds per step of clip-b128 and queue-b128, calibrated alternately in this process."""
    times = {"clip-b128": [], "queue-b128": []}
    for _ in range(rounds):
        for name in times:
            overrides = aux_heads.base_overrides(world, work / f"overhead-{name}", 128) + VARIANTS[name][1]
            times[name].append(aux_heads.calibrate(overrides, 8))
    median = {name: sorted(values)[len(values) // 2] for name, values in times.items()}
    return {"s_per_step": times, "median_s_per_step": median,
            "queue_over_clip": round(median["queue-b128"] / median["clip-b128"], 3), "target": "<= 1.15"}


def train_subprocess(overrides: list[str], steps: int) -> dict:
    """`mmssl train` in a child process; its peak RSS sampled every 0.2 s."""
    import psutil

    command = [sys.executable, "-m", "mmssl", "train", "--config", "tiny", *overrides, f"train.steps={steps}",
               f"train.warmup={max(1, steps // 10)}"]
    started = time.perf_counter()
    # stderr to a file: a pipe nobody reads fills with the progress bar (64 KiB) and blocks the child
    with tempfile.TemporaryFile("w+") as log:
        child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log, text=True)
        process, peak = psutil.Process(child.pid), 0
        while child.poll() is None:
            try:
                peak = max(peak, process.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.2)
        if child.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"training failed: {' '.join(command)}\n{log.read()[-2000:]}")
    output = Path(aux_heads.overrides_value(overrides, "train.output"))
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    timed = records[1:] or records
    return {"steps": steps, "train_seconds": round(time.perf_counter() - started, 1),
            "samples_per_s": round(sum(r["samples_per_s"] for r in timed) / len(timed), 1),
            "peak_rss_mib": round(peak / 2**20, 1), "final_loss": records[-1]["loss"],
            "checkpoint": str(output / "checkpoints" / "latest.pt")}


def evaluate(checkpoint: Path, world: Path, probe_world: Path) -> dict:
    from eval.embed import load_model
    from eval.linear_probe import run_linear_probe
    from eval.retrieval import run_retrieval
    from eval.zeroshot import run_zeroshot

    loaded = load_model(str(checkpoint), precision="fp32")
    val = run_zeroshot(loaded, str(world / "val"), workers=1)["result"]["metrics"]
    heldout = run_zeroshot(loaded, str(world / "heldout"), workers=1)["result"]["metrics"]
    retrieval = run_retrieval(loaded, str(world / "val"), workers=1)["result"]["metrics"]
    probe = run_linear_probe(loaded, str(probe_world / "val"), str(world / "val"), workers=1)["metrics"]
    return {"zeroshot_top1_val": val["acc1"], "zeroshot_top1_heldout": heldout["acc1"],
            "image_retrieval_r1": retrieval["image_retrieval_recall@1"],
            "image_retrieval_r10": retrieval["image_retrieval_recall@10"],
            "text_retrieval_r1": retrieval["text_retrieval_recall@1"],
            "linear_probe_top1": probe["lp_acc1"]}


def evaluate_image_only(checkpoint: str, world: Path, probe_world: Path) -> dict:
    """Linear probe and 20-NN top-1 on the 48 labels (probe world's val trains, this world's val tests)."""
    import torch

    from eval.embed import load_model
    from eval.knn import run_knn
    from eval.linear_probe import run_linear_probe

    torch.manual_seed(0)                       # the random-init variant's weights
    loaded = load_model(checkpoint, precision="fp32")
    probe = run_linear_probe(loaded, str(probe_world / "val"), str(world / "val"), workers=1)["metrics"]
    knn = run_knn(loaded, str(probe_world / "val"), str(world / "val"), workers=1)["metrics"]
    return {"linear_probe_top1": probe["lp_acc1"], "knn_top1": knn["knn_acc1"],
            **attribute_probes(loaded, world, probe_world)}


def attribute_probes(loaded, world: Path, probe_world: Path) -> dict:
    """Linear-probe top-1 of the colour (8-way) and of the shape (6-way) alone, on the same frozen
    features: what each half of the 48 labels keeps (SimCLR's colour jitter is built to remove colour)."""
    from eval.linear_probe import embed_train_test, linear_probe

    sets = embed_train_test(loaded, str(probe_world / "val"), str(world / "val"), 256, 1, False, "attribute probes")
    out = {}
    for name, of_label in (("colour", lambda y: y // 6), ("shape", lambda y: y % 6)):
        probe = linear_probe(sets["train"].features, of_label(sets["train"].labels), sets["test"].features,
                             of_label(sets["test"].labels))
        out[f"{name}_probe_top1"] = probe.metrics["lp_acc1"]
    return out


if __name__ == "__main__":
    main()
