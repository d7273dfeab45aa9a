"""Fault injection for whole commands: SIGKILL at random moments, then resume, then compare with an
uninterrupted run; disk-full during writes; a corrupt shard inside a training stream.

Shared by `tests/test_faults.py` (a few kills, in the suite) and `bench/faults.py` (30+ kills,
JSON report). Each scenario is a real `python -m mmssl ...` subprocess in its own process group,
so a kill also takes its DataLoader / pool workers, exactly as an OOM killer or a lost node would.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from helpers import micro_overrides, write_micro_model

REPO = Path(__file__).resolve().parents[1]


def mmssl(argv: list, *, limit_file_bytes: int | None = None, env: dict | None = None,
          timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m mmssl ARGV` to completion (optionally under RLIMIT_FSIZE, SIGXFSZ ignored so
    an oversized write fails with EFBIG like a full disk, instead of killing the process)."""
    return subprocess.run([sys.executable, "-m", "mmssl", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env=_env(env), cwd=REPO,
                          preexec_fn=_file_size_limit(limit_file_bytes) if limit_file_bytes else None)


def _env(extra: dict | None) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _file_size_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def run_killed_at(argv: list, delay: float, env: dict | None = None) -> bool:
    """Start `python -m mmssl ARGV`, SIGKILL its whole process group after `delay` seconds;
    True when the kill landed before the command finished on its own."""
    process = subprocess.Popen([sys.executable, "-m", "mmssl", *map(str, argv)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=_env(env), cwd=REPO, start_new_session=True)
    try:
        process.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return True


@dataclass
class Scenario:
    """One command under test: how to prepare its inputs, start it, resume it, and compare outputs."""

    name: str
    setup: Callable[[Path], None]              # inputs into WORK (once)
    start: Callable[[Path, Path], list]        # argv of a fresh run writing OUT
    resume: Callable[[Path, Path], list]       # argv that continues a killed run into OUT
    fingerprint: Callable[[Path], dict]        # what must be identical to the uninterrupted run
    progress: Callable[[Path], int] = lambda out: sum(1 for p in out.rglob("*") if p.is_file()) if out.exists() else 0
    env: dict = field(default_factory=dict)
    rebuild: bool = False    # each trial starts from a finished output, which must stay whole through the kill


@dataclass
class KillReport:
    scenario: str
    trials: int = 0
    kills_landed: int = 0
    identical: int = 0
    failures: list = field(default_factory=list)
    reference_seconds: float = 0.0
    progress_at_kills: list = field(default_factory=list)   # what each killed run had written (see Scenario)
    whole_after_kill: int = 0                                # rebuild scenarios: output intact right after a kill


def kill_trials(scenario: Scenario, work: Path, trials: int, seed: int = 0, kills_per_trial: int = 1) -> KillReport:
    """Run the scenario once uninterrupted, then `trials` times killed at random moments
    (`kills_per_trial` kills in a row, each on the previous resume) and resumed to the end."""
    report = KillReport(scenario.name, trials)
    work.mkdir(parents=True, exist_ok=True)
    scenario.setup(work)
    reference = work / f"{scenario.name.replace(' ', '_')}_reference"
    started = time.perf_counter()
    done = mmssl(scenario.start(work, reference), env=scenario.env)
    report.reference_seconds = round(time.perf_counter() - started, 2)
    if done.returncode != 0:
        raise RuntimeError(f"{scenario.name}: the uninterrupted run failed: {done.stderr[-2000:]}")
    expected = scenario.fingerprint(reference)
    rng = random.Random(f"{scenario.name}:{seed}")
    for trial in range(trials):
        out = work / f"{scenario.name.replace(' ', '_')}_trial{trial}"
        if scenario.rebuild:
            shutil.copytree(reference, out)
        argv = scenario.start(work, out)
        for _ in range(kills_per_trial):
            # within the run's lifetime: start-up included, and early enough that the kill lands even
            # when this run is much faster than the (first, cold) reference run on a loaded machine, or
            # when the whole command takes a fifth of a second (prep csv on a fast CPU)
            reference_s = report.reference_seconds
            landed = run_killed_at(argv, rng.uniform(max(0.02, 0.1 * reference_s), max(0.1, 0.6 * reference_s)),
                                   scenario.env)
            report.kills_landed += landed
            if landed:
                report.progress_at_kills.append(scenario.progress(out))
            if scenario.rebuild:
                report.whole_after_kill += _fingerprint_or_none(scenario, out) == expected
            argv = scenario.resume(work, out)
        finished = mmssl(argv, env=scenario.env)
        got = scenario.fingerprint(out) if finished.returncode == 0 else None
        if got == expected:
            report.identical += 1
        else:
            report.failures.append({"trial": trial, "returncode": finished.returncode,
                                    "stderr": finished.stderr[-500:],
                                    "differs": sorted(k for k in expected if got is None or got.get(k) != expected[k])})
        shutil.rmtree(out, ignore_errors=True)
    return report


def _fingerprint_or_none(scenario: Scenario, out: Path):
    try:
        return scenario.fingerprint(out)
    except (OSError, ValueError, KeyError):
        return None


# --- fingerprints ----------------------------------------------------------------------------

def file_digests(folder: Path, skip: Callable[[str], bool] = lambda name: False) -> dict:
    """SHA-256 of every file under `folder`, by relative path."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file() and not skip(path.name)}


def training_fingerprint(output: Path) -> dict:
    """Every logged step's loss terms (bitwise) and the final weights, optimizer and data position."""
    import torch

    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [(r["step"], r["loss"], r.get("contrastive_loss"), r.get("corrupt_samples")) for r in records]
    state = torch.load(output / "checkpoints" / "latest.pt", map_location="cpu", weights_only=True)
    digest = hashlib.sha256()
    for name in sorted(state["model"]):
        digest.update(name.encode())
        digest.update(state["model"][name].numpy().tobytes())
    buffer = io.BytesIO()
    torch.save(state["optimizer"], buffer)
    return {"losses": losses, "step": state["step"], "model_sha256": digest.hexdigest(),
            "optimizer_bytes": len(buffer.getvalue()), "data": json.dumps(state["data"], sort_keys=True)}


def index_fingerprint(folder: Path) -> dict:
    """The index and metadata bytes, and index_info.json without its timings."""
    info = json.loads((folder / "index_info.json").read_text())
    info.pop("timings_s", None)
    return {**file_digests(folder, skip=lambda name: name == "index_info.json"),
            "info": json.dumps(info, sort_keys=True)}


# --- scenarios -------------------------------------------------------------------------------

def write_caption_table(work: Path, rows: int = 240, size: int = 48) -> Path:
    """`rows` small PNG images with captions in a CSV (and a few broken rows, as real tables have)."""
    images = work / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    table = work / "pairs.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption", "source"])
        for i in range(rows):
            name = f"img{i:04d}.png"
            if i % 50 != 7:  # every 50th row names a missing file: it must land in failures.jsonl
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(images / name)
            writer.writerow([f"images/{name}", f"picture number {i}", "fault-harness"])
    return table


def prep_csv_scenario(rows: int = 240) -> Scenario:
    def argv(work, out):
        return ["prep", "csv", "--input", work / "pairs.csv", "--out", out, "--image-size", "32",
                "--shard-size", "40", "--workers", "2", "--quiet"]

    return Scenario("prep csv", setup=lambda work: write_caption_table(work, rows),
                    start=argv, resume=lambda work, out: [*argv(work, out), "--resume"],
                    fingerprint=file_digests, progress=lambda out: len(list(out.glob("*.tar"))))  # shards done


def train_world(work: Path, num_train: int = 400) -> None:
    if not (work / "syn" / "train" / "manifest.json").is_file():
        done = mmssl(["prep", "synthetic", "--out", work / "syn", "--num-train", num_train, "--num-val", 16,
                      "--num-heldout", 8, "--image-size", 32, "--shard-size", 100, "--quiet"])
        assert done.returncode == 0, done.stderr
    write_micro_model(work)


def train_argv(work: Path, out: Path, steps: int = 30, *extra) -> list:
    # the tests' micro-model overrides (later overrides win), checkpoints every 5 steps
    return ["train", "--config", "tiny", *micro_overrides(work, out), f"train.steps={steps}", "train.save_every=5",
            "train.optimizer=adamw", *extra]


def train_scenario(steps: int = 30) -> Scenario:
    def steps_logged(out):
        metrics = out / "metrics.jsonl"
        return metrics.read_text().count("\n") if metrics.is_file() else 0

    return Scenario("train", setup=train_world, start=lambda work, out: train_argv(work, out, steps),
                    resume=lambda work, out: train_argv(work, out, steps, "train.resume=latest"),
                    fingerprint=training_fingerprint, progress=steps_logged)


def index_scenario(n: int = 25_000, dim: int = 32) -> Scenario:
    def setup(work):
        from eval.index.synthetic import clustered_vectors

        np.save(work / "emb.npy", clustered_vectors(n, dim, num_clusters=60, rank=8, seed=3))

    def argv(work, out):
        return ["index", "build", "--embeddings", work / "emb.npy", "--out", out]

    # one thread: HNSW construction with several threads may link the graph in another order
    def stage(out):  # 1 while the new folder was being staged beside the old one, else 0
        return int(any(out.parent.glob(f".{out.name}.building-*")))

    return Scenario("index build", setup=setup, start=argv, resume=argv, fingerprint=index_fingerprint,
                    progress=stage, env={"OMP_NUM_THREADS": "1"}, rebuild=True)


SCENARIOS = {"prep": prep_csv_scenario, "train": train_scenario, "index": index_scenario}


# --- disk full and corrupt shards ------------------------------------------------------------

def disk_full_during_checkpoint(work: Path) -> dict:
    """A run stopped after its step-10 save; resuming it with files capped below a checkpoint's size
    must stop at its next save with one line, leave step 10 and latest.pt intact, and resume to the
    same result as an uninterrupted run."""
    train_world(work)
    straight, run = work / "df_straight", work / "df_run"
    assert mmssl(train_argv(work, straight, 20)).returncode == 0
    shutil.copytree(straight, run)
    for later in ("step_000015.pt", "step_000020.pt", "latest.pt"):  # as if stopped right after step 10
        (run / "checkpoints" / later).unlink()
    os.symlink("step_000010.pt", run / "checkpoints" / "latest.pt")
    checkpoint = run / "checkpoints" / "step_000010.pt"
    before = checkpoint.read_bytes()
    full = mmssl(train_argv(work, run, 20, "train.resume=latest"), limit_file_bytes=len(before) // 2)
    last_line = full.stderr.strip().splitlines()[-1] if full.stderr.strip() else ""
    leftovers = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("."))
    intact = checkpoint.read_bytes() == before and (run / "checkpoints" / "latest.pt").resolve() == checkpoint.resolve()
    resumed = mmssl(train_argv(work, run, 20, "train.resume=latest"))
    same = resumed.returncode == 0 and training_fingerprint(run) == training_fingerprint(straight)
    return {"returncode": full.returncode, "message": last_line, "temp_files_left": leftovers,
            "previous_checkpoint_intact": intact, "resumed_identical": same}


def corrupt_shard_in_training(work: Path) -> dict:
    """A shard of random bytes listed in the middle of the manifest: training counts its samples
    as corrupt, skips them and finishes."""
    train_world(work)
    data = work / "syn_bad"
    shutil.rmtree(data, ignore_errors=True)
    shutil.copytree(work / "syn" / "train", data)
    manifest = json.loads((data / "manifest.json").read_text())
    middle = manifest["shards"][0]
    (data / "garbage.tar").write_bytes(os.urandom(64 * 1024))
    manifest["shards"].insert(1, {"url": "garbage.tar", "count": middle["count"] // 4})
    (data / "manifest.json").write_text(json.dumps(manifest))
    out = work / "corrupt_run"
    shutil.rmtree(out, ignore_errors=True)
    argv = [a if not str(a).startswith("data.train=") else f"data.train={data}" for a in train_argv(work, out, 30)]
    done = mmssl(argv)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] if done.returncode == 0 else []
    total = sum(shard["count"] for shard in manifest["shards"])
    return {"returncode": done.returncode, "steps": records[-1]["step"] if records else 0,
            "corrupt_samples": records[-1]["corrupt_samples"] if records else None,
            "garbage_shard_samples": middle["count"] // 4,
            "left_out_per_epoch": total % 16,  # samples past the last full batch (batch 16, one rank)
            "stderr_tail": done.stderr[-300:]}


def disk_full_during_prep(work: Path) -> dict:
    """`prep csv` with files capped below one shard's size: exit 2 with one line, no temp file, the
    shards finished before intact; a resume without the cap gives the uninterrupted dataset."""
    write_caption_table(work)
    scenario = prep_csv_scenario()
    reference, run = work / "dfp_reference", work / "dfp_run"
    assert mmssl(scenario.start(work, reference)).returncode == 0
    expected = file_digests(reference)
    shard_bytes = (reference / "00001.tar").stat().st_size
    full = mmssl(scenario.start(work, run), limit_file_bytes=shard_bytes // 2)
    lines = full.stderr.strip().splitlines()
    leftovers = sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp")) if run.is_dir() else []
    partial = file_digests(run) if run.is_dir() else {}
    earlier_intact = all(expected.get(name) == digest for name, digest in partial.items() if name.endswith(".tar"))
    resumed = mmssl(scenario.resume(work, run))
    return {"returncode": full.returncode, "stderr_lines": len(lines), "message": lines[-1] if lines else "",
            "temp_files_left": leftovers, "finished_shards_intact": earlier_intact,
            "resumed_identical": resumed.returncode == 0 and file_digests(run) == expected}
