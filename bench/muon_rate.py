"""Step rate of `configs/tiny.yaml` with Muon against the same run with AdamW; prints one JSON object.

Both optimizers train the tiny ViT on the same synthetic shards (bf16 where native, `data.workers=0`,
40 steps, the first 10 left out); the runs alternate over `--rounds` so that load on the box hits
both, and each side's best round counts. `--tree NAME=PATH` (repeatable) runs the same pair from
other checkouts (e.g. a `git worktree` of the commit before a change), so before and after are
measured in one run. Target (issue 17): Muon >= 90% of AdamW's samples/s.

    python bench/muon_rate.py [--rounds 3] [--tree before=/path/to/worktree] [--tree after=.]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def step_rate(root: Path, data: Path, optimizer: str, output: Path, steps: int, skip: int) -> float:
    """Median samples/s over the steps after `skip` of one `mmssl train` run from checkout `root`."""
    subprocess.run([sys.executable, "-m", "mmssl", "train", "--config", "tiny", f"data.train={data}/train",
                    "data.val=null", "data.workers=0", f"train.steps={steps}", f"train.optimizer={optimizer}",
                    "train.log_every=1", "train.save_every=0", f"train.output={output}"],
                   check=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["samples_per_s"] for r in records if r.get("step", 0) > skip and "samples_per_s" in r)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                        help="a checkout to measure (default: this one, as 'here')")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=10)
    args = parser.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree) or {"here": str(REPO)}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        subprocess.run([sys.executable, "-m", "mmssl", "prep", "synthetic", "--out", str(work / "syn"), "--num-train",
                        str(args.steps * 128 + 1280), "--num-val", "96", "--shifts", "none", "--quiet"],
                       check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        rates: dict = {}
        for round_ in range(args.rounds):
            for name, root in trees.items():
                for optimizer in ("adamw", "muon"):
                    rate = step_rate(Path(root).resolve(), work / "syn", optimizer,
                                     work / f"{name}-{optimizer}-{round_}", args.steps, args.skip)
                    rates.setdefault(name, {}).setdefault(optimizer, []).append(round(rate, 1))
                    print(json.dumps({"tree": name, "optimizer": optimizer, "round": round_, "samples_per_s": rate}),
                          file=sys.stderr, flush=True)
    result = {"rounds": rates, "machine": f"{os.cpu_count()} cores"}
    for name, runs in rates.items():
        result[f"{name}_muon_over_adamw"] = round(max(runs["muon"]) / max(runs["adamw"]), 3)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
