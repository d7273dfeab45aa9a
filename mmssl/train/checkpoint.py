"""Checkpoints: one atomic file per save, a `latest.pt` pointer, exact-resume state, and the rules
that keep a run folder's history from being lost.

Layout under `<train.output>/checkpoints/`: `step_{step:06d}.pt` files (the dict format in
DESIGN.md) and `latest.pt`, a relative symlink to the newest one. A symlink rather than a pointer
file because every reader (`torch.load`, `mmssl.create_model`, open_clip tooling) follows it
without knowing about it, and rather than a copy because it costs no disk; where the filesystem has
no symlinks it falls back to a copy. Both the file and the pointer are written under a temporary
name, fsynced, renamed with `os.replace`, and the folder is fsynced after the rename, so a run
killed mid-save never leaves a torn checkpoint and `latest.pt` always names a complete one; a
save that fails (disk full) removes its temporary file and leaves the previous checkpoint as it was.

Starting a run (`start_point`): a fresh start into a folder that already holds a run is refused
unless `train.overwrite=true` (which removes only what a run writes); `resume=latest` falls back
to the newest readable `step_*.pt` when `latest.pt` is missing or unreadable, and says so.

Everything stored is a tensor or plain Python data, so `torch.load(..., weights_only=True)` reads
it, and a checkpoint from elsewhere cannot run code when loaded. Reading one file, and the folder
names, belong to `mmssl.models.refs`, shared with every other command that loads a checkpoint.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mmssl.errors import UserError
from mmssl.models.refs import CHECKPOINT_DIR, LATEST, read_checkpoint, run_checkpoint

CHECKPOINT_VERSION = 1
TRAINING_KEYS = ("model", "optimizer", "scheduler", "step")  # what resuming needs from a checkpoint
METRICS = "metrics.jsonl"
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")
_TMP_FILE = re.compile(r"^\.(step_\d+\.pt|latest\.pt)\.tmp\d+$")


def checkpoint_dir(output: str | Path) -> Path:
    return Path(output) / CHECKPOINT_DIR


def checkpoint_path(output: str | Path, step: int) -> Path:
    return checkpoint_dir(output) / f"step_{step:06d}.pt"


def step_files(output: str | Path) -> list[Path]:
    """The `step_*.pt` files of a run, newest (highest step) first."""
    folder = checkpoint_dir(output)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in folder.iterdir() if (m := _STEP_FILE.match(path.name))]
    return [path for _, path in sorted(found, reverse=True)]


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (where the OS lets a folder be opened)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def save_checkpoint(output: str | Path, step: int, state: dict, keep: int = 0) -> Path:
    """Write `state` (plus step and version) as step_{step}.pt atomically, point latest.pt at it,
    then keep only the newest `keep` step files (0: all). A failed write raises UserError and
    leaves no temporary file; the previous checkpoint and latest.pt are untouched."""
    path = checkpoint_path(output, step)
    write_torch_file(path, {**state, "step": step, "version": CHECKPOINT_VERSION})
    try:
        _point_latest(path)
    except OSError as err:
        reason = _os_reason(err) or _first_line(err)
        raise UserError(f"cannot save checkpoint {path}: {reason}; nothing earlier was changed") from None
    if keep:
        for old in step_files(output)[keep:]:
            old.unlink(missing_ok=True)
    return path


def write_torch_file(path: Path, payload: dict) -> Path:
    """torch.save `payload` to `path` atomically (temporary file, fsync, rename, fsync the folder). A
    failed write raises UserError and leaves no temporary file; an earlier `path` is untouched."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {path.parent}: {err.strerror or err}") from None
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except (OSError, RuntimeError) as err:  # torch's zip writer reports a failed write as RuntimeError
        tmp.unlink(missing_ok=True)
        reason = _os_reason(err) or _first_line(err)
        raise UserError(f"cannot save checkpoint {path}: {reason}; nothing earlier was changed") from None
    return path


def _point_latest(target: Path) -> None:
    latest = target.parent / LATEST
    tmp = target.parent / f".{LATEST}.tmp{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.symlink(target.name, tmp)
        except OSError:
            shutil.copyfile(target, tmp)
        os.replace(tmp, latest)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def holds_run(output: str | Path) -> bool:
    """Whether `output` has what an earlier run wrote: a checkpoint or a non-empty metrics log."""
    folder = checkpoint_dir(output)
    has_checkpoint = bool(step_files(output)) or (folder / LATEST).is_symlink() or (folder / LATEST).exists()
    metrics = Path(output) / METRICS
    return has_checkpoint or (metrics.is_file() and metrics.stat().st_size > 0)


def clear_run(output: str | Path) -> None:
    """Remove what a run writes (checkpoints, latest.pt, metrics.jsonl, tensorboard/); nothing else."""
    for path in step_files(output):
        path.unlink()
    remove_leftovers(output)
    folder = checkpoint_dir(output)
    for path in (folder / LATEST, Path(output) / METRICS):
        if path.is_symlink() or path.exists():
            path.unlink()
    shutil.rmtree(Path(output) / "tensorboard", ignore_errors=True)


def remove_leftovers(output: str | Path) -> None:
    """Delete temporary files a killed save left behind."""
    folder = checkpoint_dir(output)
    if folder.is_dir():
        for path in folder.iterdir():
            if _TMP_FILE.match(path.name):
                path.unlink(missing_ok=True)


def start_point(output: str | Path, resume: Optional[str], overwrite: bool = False,
                may_write: bool = True) -> Optional[tuple[Path, dict]]:
    """(checkpoint path, state) to resume from, or None for a fresh start, after enforcing the
    run-folder rules. `may_write` is False on ranks other than 0 (they only read)."""
    if resume and overwrite:
        raise UserError("train.overwrite=true starts again and train.resume continues: set only one")
    if may_write:
        remove_leftovers(output)
    if resume:
        return find_resume(resume, output)
    if holds_run(output):
        if not overwrite:
            raise UserError(f"{output} already holds a training run; resume it with train.resume=latest, "
                            "or pass train.overwrite=true to replace it")
        if may_write:
            clear_run(output)
    return None


def find_resume(resume: str, output: str | Path) -> Optional[tuple[Path, dict]]:
    """`latest`: latest.pt, else the newest readable step file (saying so), else None when the run
    has no checkpoint yet; a path: that checkpoint (UserError when missing or unreadable)."""
    if resume != "latest":
        path = Path(resume)
        if not path.is_file():
            raise UserError(f"train.resume: checkpoint not found: {resume}")
        return path.resolve(), load_checkpoint(path)
    latest = run_checkpoint(output)
    problem = None
    if latest.exists():
        try:
            return latest.resolve(), load_checkpoint(latest)
        except UserError as err:
            problem = f"{latest} is unreadable ({err})"
    elif latest.is_symlink():
        problem = f"{latest} points to a missing file"
    candidates = step_files(output)
    for path in candidates:
        if latest.exists() and path == latest.resolve():
            continue
        try:
            state = load_checkpoint(path)
        except UserError as err:
            problem = f"{problem}; {path.name} is unreadable too ({err})" if problem else f"{path.name}: {err}"
            continue
        sys.stderr.write(f"mmssl: {problem or f'{latest} is missing'}; resuming from {path} instead\n")
        return path.resolve(), state
    if candidates or problem:
        raise UserError(f"no readable checkpoint under {checkpoint_dir(output)} ({problem or 'all unreadable'}); "
                        "pass train.overwrite=true to start again")
    return None


def load_checkpoint(path: str | Path) -> dict:
    """One training checkpoint file, with everything resuming needs (UserError otherwise)."""
    return read_checkpoint(path, TRAINING_KEYS)


def _os_reason(err: BaseException) -> str | None:
    """The strerror of the OSError behind `err` (torch wraps a failed write of its zip writer in a
    RuntimeError whose context is the OSError, e.g. 'No space left on device')."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.strerror:
            return err.strerror
        err = err.__cause__ or err.__context__
    return None


def _first_line(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


def rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) generator states, in weights_only-loadable types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.copy()), "pos": pos,
                  "has_gauss": has_gauss, "cached_gaussian": cached},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuples(state["python"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy(), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value):
    """random.setstate wants the nested tuples it produced; a load may hand back lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
