"""`mmssl eval suite` against one `mmssl eval` process per evaluation, on the same data in the same run.

Four evaluations of one checkpoint (a seeded tiny-vit-64): zero-shot on synthetic val shards,
zero-shot on the heldout split exported to CLIP_benchmark's layout, retrieval on val and on
heldout. The suite runs them in one process with the model loaded once; the anchor is the same
four as separate `mmssl eval` subprocesses, run one after the other, which is what a shell loop
over datasets does. Both are timed as whole processes (start-up and imports included: that is
what loading once saves), in alternating rounds (suite first in even rounds, separate first in
odd ones) so that a burst of load from other jobs on the box hits both. The metrics of the two
paths are compared too. Prints one JSON object; `separate_over_suite` is the figure.

    python bench/suite.py [--samples 1000] [--rounds 3] [--workers 2] [--batch-size 256]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# run as `python bench/suite.py`, this folder heads sys.path and bench/eval.py would shadow `eval`
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the box is shared; see tests/conftest.py

MMSSL = [sys.executable, "-m", "mmssl"]


def mmssl(*argv: str) -> str:
    return subprocess.run([*MMSSL, *argv], check=True, capture_output=True, text=True).stdout


def prepare(root: Path, samples: int) -> tuple[Path, list]:
    """A seeded tiny-vit-64 checkpoint and the four evaluations: [(task, data)]."""
    import torch

    import mmssl as library
    from mmssl.config import ExperimentConfig, to_dict

    mmssl("prep", "synthetic", "--out", str(root / "syn"), "--num-train", "1", "--num-val", str(samples),
          "--num-heldout", str(max(samples // 4, 1)), "--quiet", "--workers", "2")
    mmssl("prep", "export-clip-benchmark", "--data", str(root / "syn" / "heldout"), "--out", str(root / "wds_heldout"),
          "--quiet")
    torch.manual_seed(0)
    model = library.create_model("tiny-vit-64")
    checkpoint = root / "tiny.pt"
    torch.save({"model": model.state_dict(), "config": to_dict(ExperimentConfig()), "heads": {}, "step": 0},
               checkpoint)
    evaluations = [("zeroshot", root / "syn" / "val"), ("zeroshot", root / "wds_heldout"),
                   ("retrieval", root / "syn" / "val"), ("retrieval", root / "syn" / "heldout")]
    return checkpoint, evaluations


def timed(work) -> tuple[float, object]:
    start = time.perf_counter()
    value = work()
    return time.perf_counter() - start, value


def run_suite(checkpoint: Path, datasets: Path, out: Path, common: list) -> list:
    mmssl("eval", "suite", "--checkpoint", str(checkpoint), "--datasets", str(datasets), "--out", str(out), *common)
    results = [json.loads(path.read_text()) for path in out.glob("*.json")]
    return sorted((r["task"], r["dataset"], json.dumps(r["metrics"], sort_keys=True)) for r in results)


def run_separately(checkpoint: Path, evaluations: list, common: list) -> list:
    results = [json.loads(mmssl("eval", task, "--checkpoint", str(checkpoint), "--data", str(data), *common))
               for task, data in evaluations]
    return sorted((r["task"], r["dataset"], json.dumps(r["metrics"], sort_keys=True)) for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000, help="synthetic val samples (heldout: a quarter)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    common = ["--workers", str(args.workers), "--batch-size", str(args.batch_size)]
    times = {"suite": [], "separate": []}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        checkpoint, evaluations = prepare(root, args.samples)
        datasets = root / "datasets.txt"
        datasets.write_text("".join(f"{task} {data}\n" for task, data in evaluations))
        same = True
        for round_ in range(args.rounds):
            order = ("suite", "separate") if round_ % 2 == 0 else ("separate", "suite")
            outcome = {}
            for kind in order:
                if kind == "suite":
                    seconds, outcome[kind] = timed(lambda: run_suite(checkpoint, datasets, root / f"out{round_}", common))
                else:
                    seconds, outcome[kind] = timed(lambda: run_separately(checkpoint, evaluations, common))
                times[kind].append(seconds)
            same &= outcome["suite"] == outcome["separate"]
    suite, separate = statistics.median(times["suite"]), statistics.median(times["separate"])
    print(json.dumps({
        "bench": "suite",
        "evaluations": len(evaluations), "samples": args.samples, "model": "tiny-vit-64 (seeded checkpoint)",
        "rounds": args.rounds, "workers": args.workers, "cpu_count": os.cpu_count(),
        "suite_seconds": [round(t, 2) for t in times["suite"]],
        "separate_seconds": [round(t, 2) for t in times["separate"]],
        "suite_median_s": round(suite, 2), "separate_median_s": round(separate, 2),
        "separate_over_suite": round(separate / suite, 2),
        "same_metrics": same,
    }))


if __name__ == "__main__":
    main()
