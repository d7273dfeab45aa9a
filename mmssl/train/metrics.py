"""Where training numbers go: `metrics.jsonl`, optional TensorBoard, the tqdm bar, and timing meters.

`metrics.jsonl` is the record a user (or a test, or the quickstart report) reads back: one JSON
object per log step, appended, so a resumed run continues the same file. Records past the resume
step (written by the interrupted run after its last checkpoint), and a last line torn by a kill,
are dropped first (rewriting the file atomically) so the file reads as one uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path


class MetricsLog:
    """Rank 0's sink for log-step records (a no-op on other ranks)."""

    def __init__(self, output: str | Path, enabled: bool, tensorboard: bool = False, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(output) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_records_after(self.path, resume_step)
        if tensorboard:
            self.writer = _tensorboard_writer(Path(output) / "tensorboard")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record, allow_nan=True) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl file, in order; a torn last line (a run killed while
    writing it) is left out, any other malformed line is an error."""
    with open(path) as handle:
        lines = handle.read().split("\n")
    records = []
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) - 1:  # no newline after it: the write never finished
                break
            raise ValueError(f"{path}, line {number + 1}: not a JSON record") from None
    return records


def _drop_records_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r, allow_nan=True) + "\n" for r in kept))
    os.replace(tmp, path)


def _tensorboard_writer(logdir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        sys.stderr.write("mmssl: train.tensorboard=true but tensorboard is not installed; logging to metrics.jsonl only\n")
        return None
    return SummaryWriter(str(logdir))


class WindowTimer:
    """Wall time and data-wait time over the steps since the last log line."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.steps = 0

    def waited(self, seconds: float) -> None:
        self.data_wait += seconds

    def step_done(self) -> None:
        self.steps += 1

    def summary(self, samples_per_step: int) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {
            "samples_per_s": samples_per_step * self.steps / elapsed,
            "data_wait_s": self.data_wait,
            "data_wait_frac": self.data_wait / elapsed,
            "step_time_s": elapsed / max(self.steps, 1),
        }


def progress_bar(total: int, initial: int, enabled: bool):
    """The tqdm bar over optimizer steps (disabled off rank 0)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)
