"""Fault-injection benchmark: SIGKILL `prep csv`, `train` and `index build` at random moments many
times and resume each to the end; fill the disk during a shard write and a checkpoint save; put a
corrupt shard in the middle of a training stream. Every resumed run is compared with an
uninterrupted one (shard bytes, bitwise losses and weights on CPU fp32, index bytes).

The scenarios are the ones `tests/test_faults.py` runs a few times (`tests/fault_harness.py`).
Target: >= 30 kills across the three commands, all resumed runs identical. Prints one JSON object.

    python bench/faults.py [--prep 12] [--train 10] [--index 10] [--seed 0] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import fault_harness as harness  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prep", type=int, default=12, help="killed-and-resumed prep csv runs")
    parser.add_argument("--train", type=int, default=10, help="killed-and-resumed training runs")
    parser.add_argument("--index", type=int, default=10, help="killed-and-rerun index builds")
    parser.add_argument("--kills-per-trial", type=int, default=1, help="kills in a row before a run may finish")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.workdir) as folder:
        work = Path(folder)
        kills = []
        for name, trials in (("prep", args.prep), ("train", args.train), ("index", args.index)):
            if trials:
                report = harness.kill_trials(harness.SCENARIOS[name](), work / name, trials, seed=args.seed,
                                             kills_per_trial=args.kills_per_trial)
                kills.append(asdict(report))
        disk_full = {"prep shard write": harness.disk_full_during_prep(work / "dfprep"),
                     "train checkpoint save": harness.disk_full_during_checkpoint(work / "train")}
        corrupt = harness.corrupt_shard_in_training(work / "train")
    trials = sum(r["trials"] for r in kills)
    print(json.dumps({
        "bench": "faults",
        "kills": {"trials": trials, "kills_per_trial": args.kills_per_trial,
                  "kills_landed_mid_run": sum(r["kills_landed"] for r in kills),
                  "identical_after_resume": sum(r["identical"] for r in kills),
                  "per_command": kills},
        "disk_full": disk_full,
        "corrupt_shard_in_training": corrupt,
        "seconds": round(time.perf_counter() - started, 1),
        "target": {"kills": 30, "identical": "all"},
    }, indent=2))


if __name__ == "__main__":
    main()
