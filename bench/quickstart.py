"""Wall time of the full `mmssl quickstart` (the 10-minute target) and the metrics it reaches.

Runs `mmssl quickstart --out WORK` in a fresh process exactly as a user would, then reads the
folder's quickstart.json (each step's wall time) and summary.json (val / heldout top-1, retrieval
R@1). The machine is often shared, so the same run also times an anchor before and after: a
fixed forward+backward of the quickstart model at batch 128 (`anchor_step_s`). `wall_in_anchor_steps`
(quickstart wall time / anchor step time) is the portable figure: multiply it by the anchor step
time of a quiet machine to project the quickstart's wall time there. CPU seconds of the child
process and the 1-minute load average at start and end say how busy the machine was.

usage: python bench/quickstart.py [--work DIR] [--smoke]
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as quickstart sets it, before torch loads


def anchor_step_seconds(repeats: int = 3) -> float:
    """Best-of-`repeats` wall time of one bf16 forward+backward+AdamW step of the quickstart model."""
    import torch

    from mmssl.config import load_config
    from mmssl.losses import ClipLoss
    from mmssl.models import create_model

    cfg = load_config("quickstart")
    model = create_model(cfg.model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(cfg.train.batch_size, 3, size, size)
    texts = model.tokenizer(["a small red circle on the left"] * cfg.train.batch_size)
    loss_fn = ClipLoss()
    best = float("inf")
    for i in range(repeats + 1):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images, texts)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])  # forward returns it exponentiated
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i:  # the first pass warms the allocator and kernels up
            best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="quickstart output folder (default: a temporary one, deleted after)")
    parser.add_argument("--smoke", action="store_true", help="time the --smoke variant instead")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mmssl-quickstart-bench-")) / "qs"

    result = {"smoke": args.smoke, "cores": os.cpu_count(), "load_avg_1m_start": os.getloadavg()[0]}
    anchor_before = anchor_step_seconds()
    command = [sys.executable, "-m", "mmssl", "quickstart", "--out", str(work)] + (["--smoke"] if args.smoke else [])
    started = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result["load_avg_1m_end"] = os.getloadavg()[0]
    anchor_after = anchor_step_seconds()
    if done.returncode:
        raise SystemExit(f"quickstart failed with exit {done.returncode}:\n{done.stdout}")

    plan = json.loads((work / "quickstart.json").read_text())
    anchor = min(anchor_before, anchor_after)
    result.update({
        "wall_s": round(wall, 1),
        "cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1),
        "within_10_min": wall <= 600,
        "anchor_step_s_before": round(anchor_before, 3),
        "anchor_step_s_after": round(anchor_after, 3),
        "wall_in_anchor_steps": round(wall / anchor, 1),
        "step_wall_s": {step["name"]: round(step["seconds"], 1) for step in plan["steps"]},
        "metrics": json.loads((work / "summary.json").read_text()),
        "output": str(work),
    })
    if not args.work:
        shutil.rmtree(work.parent, ignore_errors=True)
        result["output"] = None
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
