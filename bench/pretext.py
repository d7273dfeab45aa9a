"""The classic pretext tasks against SimCLR, MoCo, MAE and CLIP on one table (issue 18's benchmark).

Every variant trains the tiny config's image tower (tiny-vit-64, AdamW, fp32, batch 128, seed 0) on
the same synthetic shards for the same wall-clock budget: a short calibration measures its seconds
per step and it trains for budget / that many steps (its warmup-cosine schedule completes). The
untrained tower (`random`) is the floor. The frozen features are then scored on the 48 colour+shape
labels by a linear probe and a 20-NN classifier, both fitted on the `val` split of a second world
(seed 1) and tested on this world's `val`, `heldout` and shifted splits (noise, blur, background:
the images the tower never trained on), plus colour-only and shape-only probes on `val` that show
what each objective keeps (on `heldout`, whose colour+shape pairs no training set holds, only these two). The probe's weight decay is swept once (on a split of its training set)
and the fitted probe scores every test split; the attribute probes reuse that weight decay. samples/s comes from the run's metrics.jsonl (first window dropped).

Variants: rotation, jigsaw, colorize, deepcluster (each `loss.kind=<name>`, the image tower alone),
simclr, moco, mae, clip (image-text; its image tower is probed the same way), and one multi-task mix
(SimCLR + rotation + colourization) with fixed weights and with learned uncertainty weights.

usage: MMSSL_BENCH_THREADS=2 python bench/pretext.py [--budget-s 60] [--variants rotation,jigsaw,...]
Prints one JSON object; partial results go to stderr as each variant finishes.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


aux_heads = _load("aux_heads")              # world, overrides, calibration
ssl_objectives = _load("ssl_objectives")    # training subprocess, probe world, attribute probes

MIX = ["loss.kind=simclr", "loss.rotation_weight=1", "loss.colorize_weight=1"]
VARIANTS = {
    "random": None,                                   # the untrained tower at seed 0
    "rotation": ["loss.kind=rotation"],
    "jigsaw": ["loss.kind=jigsaw"],
    "colorize": ["loss.kind=colorize"],
    "deepcluster": ["loss.kind=deepcluster"],
    "simclr": ["loss.kind=simclr"],
    "moco": ["loss.kind=moco", "loss.queue_size=4096"],   # MoCo's 65536 would outnumber the 20k images
    "mae": ["loss.kind=mae"],
    "clip": ["loss.kind=clip"],
    "mix-fixed": MIX,
    "mix-uncertainty": MIX + ["loss.weighting=uncertainty"],
}
TEST_SPLITS = ("val", "heldout", "shift_noise", "shift_blur", "shift_background")
# the 48 labels are colour * 6 + shape (data_prep/synthetic.py): each probe reads one of them
ATTRIBUTES = {"label": lambda y: y, "colour": lambda y: y // 6, "shape": lambda y: y % 6}
PROBE_ITERS = 300     # L-BFGS iterations per probe fit (eval's default 1000 costs minutes per variant here)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=60.0, help="training seconds per variant")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--num-train", type=int, default=20000)
    parser.add_argument("--num-val", type=int, default=960)
    parser.add_argument("--work", default=str(REPO / "bench" / "results" / "pretext"))
    parser.add_argument("--reuse", action="store_true",
                        help="score the runs already trained in --work (their run.json) instead of training again")
    args = parser.parse_args()
    names = aux_heads.pick_variants(parser, args.variants, VARIANTS)

    import torch

    torch.set_num_threads(aux_heads.THREADS)
    work = Path(args.work)
    world = aux_heads.synthetic_world(work / "world", args.num_train, args.num_val)
    probe_world = ssl_objectives.probe_train_world(work / "probe_world", args.num_val)
    result = {"model": "tiny-vit-64", "budget_s": args.budget_s, "threads": aux_heads.THREADS,
              "cpu_count": os.cpu_count(), "load_avg_1m_start": os.getloadavg()[0], "num_train": args.num_train,
              "seed": 0, "test_splits": [s for s in TEST_SPLITS if (world / s).is_dir()], "variants": {}}
    for name in names:
        started = time.perf_counter()
        extra = VARIANTS[name]
        saved = work / name / "run.json"
        if extra is None:
            run = {"steps": 0, "checkpoint": "openclip:tiny-vit-64"}
        elif args.reuse and saved.is_file():
            run = json.loads(saved.read_text())
        else:
            overrides = aux_heads.base_overrides(world, work / name, 128) + extra
            seconds_per_step = aux_heads.calibrate(overrides, 4)
            run = ssl_objectives.train_subprocess(overrides, max(10, int(args.budget_s / seconds_per_step)))
            run["calibrated_s_per_step"] = round(seconds_per_step, 3)
            run.update(_logged_weights(Path(aux_heads.overrides_value(overrides, "train.output"))))
            saved.write_text(json.dumps(run))
        run.update(evaluate(run.pop("checkpoint"), world, probe_world, result["test_splits"]))
        run["bench_seconds"] = round(time.perf_counter() - started, 1)
        result["variants"][name] = run
        print(f"[pretext] {name}: {json.dumps(run)}", file=sys.stderr, flush=True)
    result["load_avg_1m_end"] = os.getloadavg()[0]
    print(json.dumps(result, indent=1))


def _logged_weights(output: Path) -> dict:
    """The last logged learned log-variances (uncertainty weighting), as effective weights 0.5 exp(-s)."""
    import math

    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    last = {key: value for key, value in records[-1].items() if key.startswith("logvar_")}
    return {"learned_weights": {key[len("logvar_"):]: round(0.5 * math.exp(-value), 4)
                                for key, value in last.items()}} if last else {}


def evaluate(checkpoint: str, world: Path, probe_world: Path, splits: list) -> dict:
    """Linear-probe and 20-NN top-1 per test split, fitted on the probe world's val; attribute probes on val."""
    import numpy as np
    import torch

    from eval.embed import load_model
    from eval.knn import knn_scores
    from eval.linear_probe import embed_labelled, fit_logistic_regression, linear_probe

    torch.manual_seed(0)                       # the random-init variant's weights
    loaded = load_model(checkpoint, precision="fp32")
    train = embed_labelled(loaded, str(probe_world / "val"), "train", 256, 1, False, "pretext bench")
    x_train = np.asarray(train.features, np.float64)
    out, probes = {}, None
    for split in splits:
        test = embed_labelled(loaded, str(world / split), "test", 256, 1, False, "pretext bench")
        x_test = np.asarray(test.features, np.float64)
        if probes is None:     # the weight decay is chosen once, on a split of the probe's training set
            sweep = linear_probe(train.features, train.labels, test.features, test.labels, max_iter=PROBE_ITERS)
            out["probe_weight_decay"] = sweep.weight_decay
            probes = {name: fit_logistic_regression(x_train, of_label(train.labels), sweep.weight_decay, PROBE_ITERS)
                      for name, of_label in ATTRIBUTES.items()}
        for name, of_label in ATTRIBUTES.items():
            if name == "label" and split == "heldout":
                continue       # heldout's colour+shape pairs are never in the probe's training labels
            out[f"{name}_probe_{split}"] = round(float(np.mean(probes[name].predict(x_test) == of_label(test.labels))), 4)
        if split != "heldout":
            scores = knn_scores(train.features, train.labels, test.features, 48)
            out[f"knn_{split}"] = round(float(np.mean(scores.argmax(1) == test.labels)), 4)
    return out


if __name__ == "__main__":
    main()
