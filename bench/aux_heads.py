"""Do the auxiliary heads help? Contrastive-only vs +MLM, +inpainting (separate / shared), SigLIP.

Every variant trains the tiny config's model (configs/tiny.yaml, tiny-vit-64) from the same seed
on the same synthetic world for the same wall-clock budget on this machine: a short calibration
run measures each variant's seconds per step, the variant then trains for budget / that many
steps (so its warmup-cosine schedule completes), and is scored zero-shot on `val` (top-1 over the
48 colour+shape classes), on `heldout` (the six unseen pairs) and by retrieval R@1 on `val`
captions. Throughput is samples/s from the run's own metrics.jsonl (first window dropped) and is
also given as a ratio to the contrastive-only anchor of the same run: on a shared machine only the
ratios mean much.

usage: python bench/aux_heads.py [--budget-s 120] [--variants contrastive,mlm,...] [--work DIR]
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# name -> overrides on top of configs/tiny.yaml (loss weights bring each term to the scale of the
# contrastive loss: MLM's cross-entropy starts near ln(49408) = 10.8, normalised-pixel MSE near 1)
VARIANTS = {
    "contrastive": [],
    "mlm": ["loss.mlm_weight=0.5"],
    "inpaint-separate": ["loss.inpaint_weight=1.0"],
    "inpaint-shared": ["loss.inpaint_weight=1.0", "heads.inpaint.mode=shared", "heads.inpaint.mask_ratio=0.5"],
    "patch-dropout": ["model.patch_dropout=0.5"],
    "siglip": ["loss.kind=siglip"],
}
ANCHOR = "contrastive"
# one intra-op thread: on a 2-core machine shared with other jobs, two torch threads spin against
# each other and a step takes ~10x longer (measured); set MMSSL_BENCH_THREADS on a free machine
THREADS = int(os.environ.get("MMSSL_BENCH_THREADS", "1"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=120.0, help="training wall-clock seconds per variant")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-train", type=int, default=20000)
    parser.add_argument("--num-val", type=int, default=960)
    parser.add_argument("--calibration-steps", type=int, default=6, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--work", default=str(REPO / "bench" / "results" / "aux_heads"))
    args = parser.parse_args()
    names = pick_variants(parser, args.variants, VARIANTS)
    if ANCHOR not in names:
        names.insert(0, ANCHOR)

    import torch

    torch.set_num_threads(THREADS)
    work = Path(args.work)
    world = synthetic_world(work / "world", args.num_train, args.num_val)
    result = {
        "model": "tiny-vit-64", "batch_size": args.batch_size, "budget_s": args.budget_s,
        "device": "cuda" if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "load_avg_1m_start": os.getloadavg()[0],
        "num_train": args.num_train, "num_val": args.num_val, "variants": {},
    }
    for name in names:
        overrides = base_overrides(world, work / name, args.batch_size) + VARIANTS[name]
        seconds_per_step = calibrate(overrides, args.calibration_steps)
        steps = max(10, int(args.budget_s / seconds_per_step))
        run = train_variant(name, overrides, steps)
        run.update(evaluate(run.pop("output"), world))
        run["calibrated_s_per_step"] = seconds_per_step
        result["variants"][name] = run
        print(f"[aux_heads] {name}: {json.dumps(run)}", file=sys.stderr, flush=True)
    anchor = result["variants"][ANCHOR]["samples_per_s"]
    for run in result["variants"].values():
        run["throughput_vs_contrastive"] = run["samples_per_s"] / anchor
    result["load_avg_1m_end"] = os.getloadavg()[0]
    print(json.dumps(result, indent=1))


def pick_variants(parser, text: str, known) -> list[str]:
    """The comma-separated names of `text`; a parser error for one not in `known`."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(f"unknown variant {unknown[0]} (known: {', '.join(known)})")
    return names


def synthetic_world(directory: Path, num_train: int, num_val: int) -> Path:
    """The synthetic world's train/val/heldout shards (generated once, reused by later runs)."""
    from data_prep.synthetic import generate

    manifests = [directory / split / "manifest.json" for split in ("train", "val")]
    counts = [json.loads(m.read_text())["num_samples"] if m.is_file() else None for m in manifests]
    if counts != [num_train, num_val]:
        generate(directory, num_train=num_train, num_val=num_val, image_size=64, seed=0, workers=2,
                 overwrite=True, quiet=True)
    return directory


def base_overrides(world: Path, output: Path, batch_size: int) -> list[str]:
    return [
        f"data.train={world / 'train'}", "data.val=null", "data.workers=1",
        f"train.output={output}", f"train.batch_size={batch_size}", "train.precision=fp32",
        "train.save_every=0", "train.val_every=0", "train.log_every=5", "train.seed=0", "train.overwrite=true",
        f"train.threads={THREADS}", "train.optimizer=adamw",  # docs/benchmarks.md's table was measured with AdamW
    ]


def calibrate(overrides: list[str], timed_steps: int) -> float:
    """Seconds per optimizer step of this variant, from a throw-away trainer (2 warm-up steps)."""
    from mmssl.config import load_config
    from mmssl.train.distributed import init_distributed
    from mmssl.train.loop import build_trainer

    cfg = load_config("tiny", overrides + ["train.steps=1000", "train.output=" + str(Path(
        overrides_value(overrides, "train.output")) / "calibration")])
    trainer = build_trainer(cfg, init_distributed())
    batches = iter(trainer.loader)
    start = None
    for step in range(2 + timed_steps):
        if step == 2:
            start = time.perf_counter()
        batch = next(batches)
        trainer.train_step(batch.images, batch.texts, batch.views)   # views: None unless the objective asks
    return (time.perf_counter() - start) / timed_steps


def overrides_value(overrides: list[str], key: str) -> str:
    return [item.split("=", 1)[1] for item in overrides if item.startswith(key + "=")][-1]


def train_variant(name: str, overrides: list[str], steps: int) -> dict:
    """Train for `steps` (10% warmup; shared mode: the last 10% unmasked) and read its metrics."""
    from mmssl.config import load_config
    from mmssl.train.loop import train

    extra = [f"train.steps={steps}", f"train.warmup={max(1, steps // 10)}"]
    if "heads.inpaint.mode=shared" in overrides:
        extra.append(f"heads.inpaint.unmasked_tune_steps={steps // 10}")
    cfg = load_config("tiny", overrides + extra)
    started = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - started
    records = [json.loads(line) for line in (Path(cfg.train.output) / "metrics.jsonl").read_text().splitlines()]
    timed = records[1:] or records
    terms = {}  # each term's last logged value (shared mode's last steps have no inpainting term)
    for record in records:
        terms.update({key: value for key, value in record.items() if key == "loss" or key.endswith("_loss")})
    return {
        "overrides": VARIANTS[name] + extra,
        "steps": steps, "train_seconds": seconds,
        "samples_per_s": sum(r["samples_per_s"] for r in timed) / len(timed),
        "final_terms": terms, "output": result.checkpoint,
    }


def evaluate(checkpoint: Path, world: Path) -> dict:
    from eval.embed import load_model
    from eval.retrieval import run_retrieval
    from eval.zeroshot import run_zeroshot

    loaded = load_model(str(checkpoint), precision="fp32")
    val = run_zeroshot(loaded, str(world / "val"), workers=1)["result"]["metrics"]
    heldout = run_zeroshot(loaded, str(world / "heldout"), workers=1)["result"]["metrics"]
    retrieval = run_retrieval(loaded, str(world / "val"), workers=1)["result"]["metrics"]
    return {
        "zeroshot_top1_val": val["acc1"], "zeroshot_top1_heldout": heldout["acc1"],
        "image_retrieval_r1": retrieval["image_retrieval_recall@1"],
        "text_retrieval_r1": retrieval["text_retrieval_recall@1"],
    }


if __name__ == "__main__":
    main()
