"""`mmssl quickstart [--out DIR] [--smoke]`: the whole job on the embedded synthetic world.

Why a plain list of command lines: quickstart must have no private code path. Every step is an
ordinary `mmssl ...` invocation, run in this process through `mmssl.cli.main`, and the same list
is written to `DIR/commands.sh` and shown in the report, so any step can be re-run alone (or all
of them with `bash DIR/commands.sh`) and give the same artefacts.

Layout of DIR (every path below is what some step's flags name):
    data/{train,val,heldout}/   shards from `mmssl prep synthetic`
    run/                        `mmssl train` output: metrics.jsonl, checkpoints/
    eval/                       zero-shot and retrieval JSON, per-class CSVs
    index/                      the FAISS search index over the val images
    search/                     one JSON per example query
    figures/                    PNGs: confusion matrix (eval), loss/accuracy curves and thumbnails (report)
    logs/                       each step's standard output
    report.html, summary.json   from `mmssl report`
    quickstart.json             the plan and each step's wall time
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mmssl.errors import UserError
from mmssl.models.refs import run_checkpoint

CONFIG = "quickstart"  # configs/quickstart.yaml, found through the bundled-config lookup
PLAN_FILE = "quickstart.json"
STEP_OUTPUTS = ("data", "run", "eval", "index", "search", "figures", "logs", "report.html", "summary.json",
                "commands.sh")
QUERIES = (
    "a red circle",
    "a large blue star",
    "a green square on the left",
    "a yellow triangle at the top",
    "a white cross",
    "a blue circle",  # a held-out composition: in neither train nor the indexed val images
)


@dataclass(frozen=True)
class Profile:
    """Data sizes and training overrides of one quickstart flavour (the YAML holds the rest)."""

    num_train: int
    num_val: int
    num_heldout: int
    train_overrides: tuple = ()
    queries: tuple = QUERIES


FULL = Profile(num_train=20000, num_val=1000, num_heldout=500)
# a seconds-long end-to-end pass: the same chain and artefacts, tiny data, a handful of steps
SMOKE = Profile(
    num_train=256, num_val=48, num_heldout=24,
    train_overrides=("train.steps=2", "train.batch_size=32", "train.warmup=1", "train.log_every=1",
                     "train.val_every=1"),
    queries=QUERIES[:1] + QUERIES[-1:],
)


@dataclass
class Step:
    """One `mmssl` command line of the chain."""

    name: str           # short id: the log file name and the report's anchor
    title: str          # what the step does, in words
    argv: list          # arguments after `mmssl`
    seconds: float = field(default=0.0)

    @property
    def command(self) -> str:
        return shlex.join(["mmssl", *self.argv])


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "quickstart",
        help="the main job: synthetic data -> training -> eval -> search index -> report.html",
        description="Generate the synthetic world, train the quickstart config, evaluate zero-shot "
        "classification (val and heldout) and retrieval, build a search index, run example queries "
        "and write DIR/report.html. Each step is a normal mmssl command (see DIR/commands.sh).",
    )
    parser.add_argument("--out", type=Path, default=Path("quickstart"), metavar="DIR",
                        help="output folder (default: quickstart)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny data and a few training steps: checks the whole chain in well under a minute")
    parser.set_defaults(func=run)


def plan(out: Path, profile: Profile) -> list[Step]:
    """The chain of command lines for one output folder."""
    data, run_dir, evals, search = out / "data", out / "run", out / "eval", out / "search"
    checkpoint = str(run_checkpoint(run_dir))
    steps = [
        Step("prep", "Generate the synthetic world (train, val, heldout shards)",
             ["prep", "synthetic", "--out", str(data), "--num-train", str(profile.num_train),
              "--num-val", str(profile.num_val), "--num-heldout", str(profile.num_heldout), "--seed", "0",
              "--shifts", "none", "--num-labelled", "0"]),  # no step reads the shifted or labelled splits
        Step("train", "Train the dual encoder (periodic zero-shot validation on val)",
             ["train", "--config", CONFIG, f"data.train={data / 'train'}", f"data.val={data / 'val'}",
              f"train.output={run_dir}", *profile.train_overrides]),
        Step("zeroshot-val", "Zero-shot classification on val (seen colour-shape pairs, 48 classes)",
             ["eval", "zeroshot", "--checkpoint", checkpoint, "--data", str(data / "val"),
              "--output", str(evals / "zeroshot_val.json"), "--per-class", str(evals / "per_class_val.csv"),
              "--confusion", str(out / "figures" / "confusion_val.png")]),
        Step("zeroshot-heldout", "Zero-shot classification on heldout (6 unseen pairs, 48 classes)",
             ["eval", "zeroshot", "--checkpoint", checkpoint, "--data", str(data / "heldout"),
              "--output", str(evals / "zeroshot_heldout.json"),
              "--per-class", str(evals / "per_class_heldout.csv")]),
        Step("retrieval", "Image-text retrieval on val",
             ["eval", "retrieval", "--checkpoint", checkpoint, "--data", str(data / "val"),
              "--output", str(evals / "retrieval_val.json")]),
        Step("index", "Build the search index over the val images",
             ["index", "build", "--checkpoint", checkpoint, "--data", str(data / "val"), "--out", str(out / "index")]),
    ]
    for number, query in enumerate(profile.queries, start=1):
        steps.append(Step(f"search-{number}", f"Text query: {query!r}",
                          ["index", "search", "--index", str(out / "index"), "--text", query, "-k", "5",
                           "--output", str(search / f"query_{number:02d}.json")]))
    steps.append(Step("report", "Write report.html from the artefacts above", ["report", "--dir", str(out)]))
    return steps


def run(args) -> int:
    # OpenMP threads that spin while waiting make torch several times slower as soon as anything
    # else competes for the cores (measured: 2 spinning threads at ~40 samples/s where 2 sleeping
    # ones train at ~160/s on a busy 2-core machine). Only effective before torch loads, which the
    # CLI defers to the handlers; an explicit OMP_WAIT_POLICY from the user wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    out: Path = args.out
    profile = SMOKE if args.smoke else FULL
    prepare_folder(out)
    steps = plan(out, profile)
    write_plan(out, steps, smoke=args.smoke)
    started = time.perf_counter()
    for number, step in enumerate(steps, start=1):
        run_step(step, number, len(steps), out)
        write_plan(out, steps, smoke=args.smoke, total=time.perf_counter() - started)
    print_summary(out, time.perf_counter() - started)
    return 0


def prepare_folder(out: Path) -> None:
    """Start from a clean DIR; refuse to touch a non-empty folder quickstart did not make."""
    import shutil

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / PLAN_FILE).is_file():
            raise UserError(f"--out {out} is not empty and holds no earlier quickstart ({PLAN_FILE}); "
                            "choose a new or empty folder")
        for name in STEP_OUTPUTS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def write_plan(out: Path, steps: list[Step], smoke: bool, total: float | None = None) -> None:
    """quickstart.json (plan + timings, read by the report) and the runnable commands.sh."""
    record = {"smoke": smoke, "total_seconds": total, "steps": [
        {**asdict(step), "command": step.command} for step in steps]}
    (out / PLAN_FILE).write_text(json.dumps(record, indent=2) + "\n")
    script = ["#!/usr/bin/env bash", "# mmssl quickstart, one command per step (run from the folder quickstart ran in)",
              "set -euo pipefail", "export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # as quickstart: no spinning threads"]
    for step in steps:
        script += [f"# {step.title}", step.command]
    (out / "commands.sh").write_text("\n".join(script) + "\n")


def run_step(step: Step, number: int, count: int, out: Path) -> None:
    """One command through the normal CLI; its stdout goes to logs/<name>.log, progress bars stay on stderr."""
    from contextlib import redirect_stdout

    from mmssl.cli import main

    sys.stderr.write(f"[{number}/{count}] {step.title}\n    $ {step.command}\n")
    sys.stderr.flush()
    log = out / "logs" / f"{step.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w") as handle, redirect_stdout(handle):
        try:
            code = main(step.argv)
        except SystemExit as exit_:  # argparse rejected the command line
            code = exit_.code
    step.seconds = time.perf_counter() - started
    if code:
        raise UserError(f"quickstart step {step.name!r} failed (exit {code}); its output is in {log}; "
                        f"re-run it alone with: {step.command}")


def print_summary(out: Path, seconds: float) -> None:
    from mmssl.report import summary_lines

    print(f"quickstart finished in {seconds / 60:.1f} min")
    for line in summary_lines(out):
        print(f"  {line}")
    print(f"  report: {out / 'report.html'}")
