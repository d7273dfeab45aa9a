"""Training throughput of `mmssl train` against open_clip's own trainer, measured in the same run.

Both train the tiny config's model (configs/models/tiny-vit-64.json) on the same synthetic shards
at batch 128, in fp32 and in bf16 autocast; each run's first steps (start-up, allocator and
compile warm-up) are dropped and samples/s is taken over the remaining steps from the trainers'
own logs (open_clip's per-window batch time, our metrics.jsonl), so process start-up counts for
neither. Also reported: model FLOPs per sample (torch's FlopCounterMode over one forward+backward),
our achieved FLOP/s, the bf16 / fp32 peak of a 2048x2048 matmul measured here and now, and the
bf16 rate this CPU reaches at the step's own GEMM shapes (`shape_limit`), the fair ceiling.

open_clip's trainer needs webdataset<=0.2.86 (we use 1.x) and pandas, so it runs from an
isolated `bench/.anchor` target directory (installed on first use, gitignored), put first on its
PYTHONPATH; our venv is untouched.

usage: python bench/train_throughput.py [--steps 40] [--skip 10] [--settings bf16-compile,bf16,fp32]
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ANCHOR = REPO / "bench" / ".anchor"
ANCHOR_PACKAGES = ["open_clip_torch==3.3.0", "webdataset==0.2.86", "pandas"]
MODEL_JSON = REPO / "configs" / "models" / "tiny-vit-64.json"
BATCH = 128

# our settings: name -> config overrides (on top of configs/tiny.yaml, whose optimizer is Muon; the
# compared settings use AdamW like the anchor, the -muon one shows what tiny.yaml itself runs at)
ADAMW = "train.optimizer=adamw"
SETTINGS = {
    "bf16-compile-w0-muon": ["train.precision=bf16", "data.workers=0", "train.compile=true", "train.optimizer=muon"],
    "fp32": ["train.precision=fp32", "data.workers=1", ADAMW],
    "bf16": ["train.precision=bf16", "data.workers=1", ADAMW],
    "bf16-w0": ["train.precision=bf16", "data.workers=0", ADAMW],
    "bf16-compile": ["train.precision=bf16", "data.workers=1", "train.compile=true", ADAMW],
    "bf16-compile-w0": ["train.precision=bf16", "data.workers=0", "train.compile=true", ADAMW],
}
ANCHOR_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--skip", type=int, default=10, help="first steps of each run left out of the rate")
    parser.add_argument("--settings", default="bf16-w0,bf16,bf16-compile-w0,fp32,bf16-compile-w0-muon")
    parser.add_argument("--anchor-workers", default="1", help="open_clip --workers values to try (best counts)")
    parser.add_argument("--anchor-precisions", default="fp32,bf16",
                        help="open_clip precisions to run (fp32 alone on a CPU without native bf16, where "
                             "bf16 matmuls are emulated and run ~400x slower)")
    parser.add_argument("--anchor-with-our-malloc", action="store_true",
                        help="also run open_clip bf16 with the glibc settings mmssl applies to itself")
    parser.add_argument("--work", default=str(REPO / "bench" / "results" / "train_throughput"))
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shards = synthetic_shards(work / "syn", num_train=args.steps * BATCH * 2)
    ensure_anchor()

    result = {"batch_size": BATCH, "steps": args.steps, "skipped_steps": args.skip, "model": MODEL_JSON.stem,
              "threads": _threads(), "load_avg_1m_start": os.getloadavg()[0]}
    result["peak_flops"] = matmul_peaks()
    result["shape_limit"] = shape_limit()
    result["model_gflops_per_sample"] = model_flops_per_sample() / 1e9
    result["mmssl_executed_gflops_per_sample"] = model_flops_per_sample(shard_captions(shards)) / 1e9
    anchor = {}
    for precision in args.anchor_precisions.split(","):
        for workers in args.anchor_workers.split(","):
            name = f"{precision}-w{workers}"
            anchor[name] = run_anchor(work / f"anchor-{name}", shards, precision, int(workers), args)
    ours = {name: run_ours(work / f"ours-{name}", shards, SETTINGS[name], args) for name in args.settings.split(",")}
    muon = {k: ours.pop(k) for k in list(ours) if k.endswith("-muon")}  # another algorithm: reported apart
    result["mmssl_muon_samples_per_s"] = muon
    result["open_clip_samples_per_s"] = anchor
    if args.anchor_with_our_malloc:  # not an open_clip setting: reported, never counted as its best
        result["open_clip_bf16_with_our_malloc_env"] = run_anchor(
            work / "anchor-bf16-malloc", shards, "bf16", 1, args, extra_env=MALLOC_ENV)
    result["mmssl_samples_per_s"] = ours
    best_anchor = max(anchor, key=anchor.get)
    best_ours = max(ours, key=ours.get)
    result["best"] = {"open_clip": best_anchor, "mmssl": best_ours,
                      "ratio": round(ours[best_ours] / anchor[best_anchor], 3)}
    for precision in ("fp32", "bf16"):  # same precision, best setting of each side
        mine = [v for k, v in ours.items() if k.split("-")[0] == precision]
        theirs = [v for k, v in anchor.items() if k.startswith(precision)]
        if mine and theirs:
            result[f"ratio_{precision}"] = round(max(mine) / max(theirs), 3)
    flops = result["mmssl_executed_gflops_per_sample"] * ours[best_ours]
    result["mmssl_best_gflops_per_s"] = round(flops, 1)
    result["mmssl_best_fraction_of_bf16_peak"] = round(flops / result["peak_flops"]["bf16_gflops"], 3)
    result["mmssl_best_fraction_of_shape_limit"] = round(flops / result["shape_limit"]["bf16_gflops"], 3)
    result["load_avg_1m_end"] = os.getloadavg()[0]
    print(json.dumps(result, indent=1))


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def synthetic_shards(folder: Path, num_train: int) -> Path:
    """The synthetic world's train split (reused when it already has enough samples)."""
    manifest = folder / "train" / "manifest.json"
    if not manifest.exists() or json.loads(manifest.read_text())["num_samples"] < num_train:
        subprocess.run([sys.executable, "-m", "mmssl", "prep", "synthetic", "--out", str(folder), "--num-train",
                        str(num_train), "--num-val", "96", "--overwrite", "--quiet"], check=True,
                       stdout=subprocess.DEVNULL)
    return folder / "train"


def ensure_anchor() -> None:
    if (ANCHOR / "open_clip_train" / "main.py").exists():
        return
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(ANCHOR), "--no-deps",
                    *ANCHOR_PACKAGES], check=True)


def matmul_peaks(size: int = 2048, repeats: int = 10) -> dict:
    """GFLOP/s of a size x size matmul in bf16 and fp32 (best of `repeats`, after a warm-up)."""
    import torch

    from mmssl.train.policy import native_bf16

    peaks = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        if dtype == torch.bfloat16 and not native_bf16(torch.device("cpu")):
            size_here = 256   # emulated bf16 (no AVX512-BF16 / AMX): ~1 GFLOP/s, so one 2048^2 product takes ~15 s
        else:
            size_here = size
        a, b = torch.randn(size_here, size_here, dtype=dtype), torch.randn(size_here, size_here, dtype=dtype)
        a @ b
        best = min(_timed(lambda: a @ b) for _ in range(repeats))
        peaks[f"{name}_gflops"] = round(2 * size_here**3 / best / 1e9, 1)
    return peaks


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def model_flops_per_sample(captions: list | None = None, batch: int = 8) -> float:
    """Forward + backward FLOPs per sample of the contrastive step (matmuls, convs, attention).

    Without captions every text row fills the context (what open_clip executes); with real
    captions our step drops their padding (mmssl.models.text_trim), so it executes fewer.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mmssl.config import load_config
    from mmssl.models import create_model
    from mmssl.objective import Objective

    cfg = load_config("tiny", [])
    model = create_model(cfg.model)
    objective = Objective(model, cfg)
    images = torch.randn(batch, 3, 64, 64)
    texts = torch.randint(0, 49408, (batch, model.tokenizer.context_length))
    if captions:
        texts = model.tokenizer(captions[:batch])
    with FlopCounterMode(display=False) as counter:
        objective(images, texts, step=0)["loss"].backward()
    return counter.get_total_flops() / batch


def shape_limit(batch: int = BATCH, repeats: int = 10) -> dict:
    """The bf16 GEMM rate this CPU reaches at the tiny step's own matmul shapes.

    One forward + backward of the contrastive step under bf16 autocast records every mm / addmm /
    bmm / baddbmm with its operand shapes (a dispatch mode); each distinct shape is then timed
    alone (best of `repeats`). The limit is the step's GEMM FLOPs over the time those GEMMs take at
    their standalone rates: what a step made of nothing but these matmuls would reach. Small
    projection-sized products are far below the 2048^2 peak, so this is the fair ceiling.
    """
    import collections

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from mmssl.config import load_config
    from mmssl.models import create_model
    from mmssl.objective import Objective

    operands = {"mm": (0, 1), "addmm": (1, 2), "bmm": (0, 1), "baddbmm": (1, 2)}

    class GemmShapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in operands:
                i, j = operands[name]
                self.seen[(tuple(args[i].shape), tuple(args[j].shape))] += 1
            return func(*args, **(kwargs or {}))

    cfg = load_config("tiny", [])
    model = create_model(cfg.model)
    objective = Objective(model, cfg)
    images = torch.randn(batch, 3, 64, 64)
    texts = torch.randint(0, 49408, (batch, model.tokenizer.context_length))
    shapes = GemmShapes()
    with torch.autocast("cpu", dtype=torch.bfloat16), shapes:
        objective(images, texts, step=0)["loss"].backward()
    total_flops = total_s = 0.0
    rates = []
    for (a, b), count in shapes.seen.items():
        x, y = torch.randn(*a, dtype=torch.bfloat16), torch.randn(*b, dtype=torch.bfloat16)
        product = (lambda: torch.bmm(x, y)) if len(a) == 3 else (lambda: x @ y)
        product()
        seconds = min(_timed(product) for _ in range(repeats))
        flops = 2 * a[-2] * a[-1] * b[-1] * (a[0] if len(a) == 3 else 1)
        total_flops += flops * count
        total_s += seconds * count
        rates.append([list(a), list(b), count, round(flops / seconds / 1e9, 1)])
    return {"bf16_gflops": round(total_flops / total_s / 1e9, 1), "gemm_gflops_per_sample": round(total_flops / batch / 1e9, 4),
            "shapes": sorted(rates, key=lambda r: -r[2])}


def shard_captions(shards: Path, count: int = 64) -> list:
    """The first captions of the first shard (for the executed-FLOPs count)."""
    import tarfile

    with tarfile.open(sorted(shards.glob("*.tar"))[0]) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".txt")][:count]
        return [tar.extractfile(m).read().decode() for m in members]


# glibc's environment equivalent of mmssl.train.allocator, for an informational anchor run
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def run_anchor(folder: Path, shards: Path, precision: str, workers: int, args, extra_env=None) -> float:
    """open_clip_train.main on the shards; samples/s over its log windows after `skip` steps."""
    urls = sorted(shards.glob("*.tar"))
    pattern = f"{shards}/{{{urls[0].stem}..{urls[-1].stem}}}.tar"
    log_every = 5
    command = [
        sys.executable, str(REPO / "bench" / "openclip_anchor.py"), str(MODEL_JSON),
        "--train-data", pattern, "--train-num-samples", str(args.steps * BATCH), "--dataset-type", "webdataset",
        "--batch-size", str(BATCH), "--precision", ANCHOR_PRECISION[precision], "--workers", str(workers),
        "--model", MODEL_JSON.stem, "--epochs", "1", "--lr", "1e-3", "--warmup", "30", "--wd", "0.1",
        "--log-every-n-steps", str(log_every), "--save-frequency", "0", "--logs", str(folder.parent),
        "--name", folder.name, "--report-to", "", "--device", "cpu", "--seed", "0",
    ]
    _fresh(folder)
    env = {**os.environ, **(extra_env or {}),
           "PYTHONPATH": os.pathsep.join([str(ANCHOR), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    windows = []  # (samples seen at the end of the window, mean batch time in it)
    for line in (folder / "out.log").read_text().splitlines():
        match = re.search(r"\[\s*(\d+)/\d+ .*Batch \(t\): ([\d.]+)", line)
        if match:
            windows.append((int(match.group(1)), float(match.group(2))))
    return _rate_after(windows, args.skip * BATCH)


def run_ours(folder: Path, shards: Path, overrides: list, args) -> float:
    """`mmssl train` on the same shards; samples/s over its metrics windows after `skip` steps."""
    _fresh(folder)
    command = [sys.executable, "-m", "mmssl", "train", "--config", "tiny", f"data.train={shards}", "data.val=null",
               f"train.output={folder}", f"train.steps={args.steps}", f"train.batch_size={BATCH}",
               "train.log_every=5", "train.save_every=0", *overrides]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    windows = [(r["step"] * BATCH, r["step_time_s"]) for r in records]
    return _rate_after(windows, args.skip * BATCH)


def _rate_after(windows: list, skip_samples: int) -> float:
    """Samples / seconds over the log windows that start at or after `skip_samples`."""
    samples = seconds = 0.0
    previous = 0
    for seen, step_time in windows:
        steps = (seen - previous) / BATCH
        if previous >= skip_samples and steps > 0:
            samples += seen - previous
            seconds += steps * step_time
        previous = seen
    if not seconds:
        raise SystemExit(f"no log window after {skip_samples} samples: raise --steps")
    return round(samples / seconds, 1)


def _fresh(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)


if __name__ == "__main__":
    main()
