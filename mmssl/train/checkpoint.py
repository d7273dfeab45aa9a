"""Checkpoints: one atomic file per save, a `latest.pt` pointer, and exact-resume state.

Layout under `<train.output>/checkpoints/`: `step_{step:06d}.pt` files (the dict format in
DESIGN.md) and `latest.pt`, a relative symlink to the newest one. A symlink rather than a pointer
file because every reader (`torch.load`, `mmssl.create_model`, open_clip tooling) follows it
without knowing about it, and rather than a copy because it costs no disk; where the filesystem has
no symlinks it falls back to a copy. Both the file and the pointer are written under a temporary
name and renamed with `os.replace`, so a run killed mid-save never leaves a torn checkpoint and
`latest.pt` always names a complete one.

Everything stored is a tensor or plain Python data, so `torch.load(..., weights_only=True)` reads it.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from mmssl.errors import UserError

CHECKPOINT_VERSION = 1
LATEST = "latest.pt"


def checkpoint_dir(output: str | Path) -> Path:
    return Path(output) / "checkpoints"


def checkpoint_path(output: str | Path, step: int) -> Path:
    return checkpoint_dir(output) / f"step_{step:06d}.pt"


def save_checkpoint(output: str | Path, step: int, state: dict) -> Path:
    """Write `state` (plus step and version) as step_{step}.pt atomically and point latest.pt at it."""
    path = checkpoint_path(output, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        torch.save({**state, "step": step, "version": CHECKPOINT_VERSION}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _point_latest(path)
    return path


def _point_latest(target: Path) -> None:
    latest = target.parent / LATEST
    tmp = target.parent / f".{LATEST}.tmp{os.getpid()}"
    try:
        os.symlink(target.name, tmp)
    except OSError:
        shutil.copyfile(target, tmp)
    os.replace(tmp, latest)


def resolve_resume(resume: str | None, output: str | Path) -> Path | None:
    """The checkpoint to resume from: None (fresh), `latest` (fresh if there is none yet), or a path."""
    if not resume:
        return None
    if resume == "latest":
        latest = checkpoint_dir(output) / LATEST
        return latest.resolve() if latest.exists() else None
    path = Path(resume)
    if not path.is_file():
        raise UserError(f"train.resume: checkpoint not found: {resume}")
    return path.resolve()


def load_checkpoint(path: str | Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: tell the user which one
        raise UserError(f"cannot read checkpoint {path}: {err.__class__.__name__}: {str(err).splitlines()[0]}") from None
    missing = {"model", "optimizer", "scheduler", "step"} - set(state)
    if missing:
        raise UserError(f"{path} is not an mmssl training checkpoint (missing {', '.join(sorted(missing))})")
    return state


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
