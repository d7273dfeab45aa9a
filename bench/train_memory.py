"""Peak resident memory of `mmssl train --config tiny` at several batch sizes; prints one JSON object.

Each run trains 12 steps on a fresh synthetic world (validation off, no checkpoints) while a
sampler reads the RSS of the training process and its children every 0.1 s; the peak and the
best logged samples/s of each batch size are reported.

    python bench/train_memory.py [--batch-sizes 128,512] [--steps 12]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent


def peak_rss(command: list) -> tuple[int, int]:
    """(peak RSS in bytes of the process tree, exit status) of `command`."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        try:
            peak = max(peak, sum(p.memory_info().rss for p in [root] + root.children(recursive=True)))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.1)
    return peak, process.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="128,512")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    result = {}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        subprocess.run([sys.executable, "-m", "mmssl", "prep", "synthetic", "--out", str(work / "syn"), "--num-train",
                        str(max(batches) * (args.steps + 1)), "--num-val", "96", "--shifts", "none", "--quiet"],
                       check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        for batch in batches:
            run = work / f"run{batch}"
            peak, code = peak_rss([sys.executable, "-m", "mmssl", "train", "--config", "tiny",
                                   f"data.train={work / 'syn/train'}", "data.val=null", f"train.batch_size={batch}",
                                   f"train.steps={args.steps}", "train.log_every=1", "train.save_every=0",
                                   f"train.output={run}"])
            if code != 0:
                raise SystemExit(f"mmssl train at batch {batch} failed ({code})")
            records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            result[str(batch)] = {"peak_rss_gib": round(peak / 2**30, 2),
                                  "best_samples_per_s": round(max(r["samples_per_s"] for r in records
                                                                  if "samples_per_s" in r), 1)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
