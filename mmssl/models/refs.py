"""Every way to name a model, and the one reader of checkpoint files.

A model reference is the string a user gives (`mmssl.create_model`, `--checkpoint`, an index
folder's recorded `model`). `parse_ref` turns it into a `ModelRef` of one kind:

- `name`: an open_clip or bundled model-config name (random init);
- `config`: a model-config JSON path;
- `checkpoint`: an mmssl checkpoint file (`.pt`, `.pth`, `.ckpt`);
- `run`: a training run folder, meaning its `checkpoints/latest.pt`;
- `openclip`: `openclip:NAME[:WEIGHTS]`, open_clip's NAME with optional local weights.

New kinds go in `_PREFIXES` (a prefix such as `hf-hub:`) or `_parse_dir` (a local Hugging Face
directory); a reference only ever names local files, nothing here downloads.

Checkpoints are read here only (`read_checkpoint`, `read_torch_file`): `weights_only=True`, so a
file from elsewhere cannot run code when loaded, and one set of one-line errors (not found, not
readable, not an mmssl checkpoint) whichever command reads the file. torch loads on first read:
naming a model costs no import.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from mmssl.errors import UserError

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")
CHECKPOINT_DIR = "checkpoints"       # a run folder's checkpoints (mmssl.train.checkpoint writes them)
LATEST = "latest.pt"                 # in CHECKPOINT_DIR: the newest complete checkpoint
OPENCLIP_PREFIX = "openclip:"
MODEL_KEYS = ("model", "config")     # what makes a torch file an mmssl checkpoint
RANDOM_INIT = "random-init"          # CLIP_benchmark's "pretrained" for a model without weights
CHECKPOINT_FLAG_KINDS = ("checkpoint", "run", "openclip")


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference. `path`: the config JSON or the checkpoint file (a run's latest.pt);
    `weights`: an openclip reference's local weights file."""

    kind: str
    name: Optional[str] = None
    path: Optional[Path] = None
    weights: Optional[Path] = None

    @property
    def is_checkpoint(self) -> bool:
        return self.kind in ("checkpoint", "run")

    @property
    def canonical(self) -> str:
        """The reference as an index records it: absolute paths (a run's latest.pt followed to its
        step file), so it names the same model from any working directory and after later saves."""
        if self.kind == "openclip":
            return f"{OPENCLIP_PREFIX}{self.name}" + (f":{self.weights.resolve()}" if self.weights else "")
        if self.kind == "name":
            return self.name
        return str(self.path.resolve())

    @property
    def pretrained(self) -> str:
        """CLIP_benchmark's "pretrained" field: the weights or checkpoint file, else random-init."""
        if self.is_checkpoint:
            return str(self.path)
        return str(self.weights) if self.weights else RANDOM_INIT

    def check(self) -> "ModelRef":
        """Self, or UserError when a file it names is missing (a config JSON is the factory's)."""
        if self.kind == "run" and not self.path.is_file():
            folder = self.path.parent.parent if self.path.parent.name == CHECKPOINT_DIR else self.path.parent
            raise UserError(f"no checkpoint in {folder} (expected {CHECKPOINT_DIR}/{LATEST})")
        if self.kind == "checkpoint":
            require_file(self.path, "checkpoint")
        if self.weights is not None:
            require_file(self.weights, "weights file")
        return self


def parse_ref(reference: str | Path | ModelRef) -> ModelRef:
    """The ModelRef for a reference; only a folder's contents are looked at, no file is opened."""
    if isinstance(reference, ModelRef):
        return reference
    text = str(reference)
    for prefix, parse in _PREFIXES.items():
        if text.startswith(prefix):
            return parse(text[len(prefix):])
    path = Path(text)
    if path.is_dir():
        return _parse_dir(path)
    if path.suffix in CHECKPOINT_SUFFIXES:
        return ModelRef("checkpoint", path=path)
    if path.suffix == ".json":
        return ModelRef("config", path=path)
    return ModelRef("name", name=text)


def checkpoint_ref(reference: str | Path | ModelRef) -> ModelRef:
    """What `--checkpoint` accepts (a checkpoint file, a run folder, or openclip:NAME[:WEIGHTS]),
    checked to exist."""
    ref = parse_ref(reference)
    if ref.kind not in CHECKPOINT_FLAG_KINDS:
        raise UserError(f"checkpoint not found: {reference} (a .pt file, a run folder, or openclip:NAME[:WEIGHTS])")
    return ref.check()


def run_checkpoint(folder: str | Path) -> Path:
    """A run folder's latest checkpoint file (whether or not it exists yet)."""
    return Path(folder) / CHECKPOINT_DIR / LATEST


def _parse_openclip(rest: str) -> ModelRef:
    name, _, weights = rest.partition(":")
    if not name:
        raise UserError(f"{OPENCLIP_PREFIX} needs a model name: {OPENCLIP_PREFIX}NAME[:WEIGHTS]")
    return ModelRef("openclip", name=name, weights=Path(weights) if weights else None)


def _parse_dir(path: Path) -> ModelRef:
    # a run folder, or its checkpoints folder itself; a local HF model directory would be told apart here
    latest = run_checkpoint(path)
    if not latest.exists() and (path / LATEST).exists():
        latest = path / LATEST
    return ModelRef("run", path=latest)


_PREFIXES: dict[str, Callable[[str], ModelRef]] = {OPENCLIP_PREFIX: _parse_openclip}


# --- reading ---------------------------------------------------------------------------------


def require_file(path: str | Path, what: str) -> Path:
    """`path`, or UserError '<what> not found: <path>'."""
    if not Path(path).is_file():
        raise UserError(f"{what} not found: {path}")
    return Path(path)


def unreadable(path: str | Path, what: str, err: BaseException) -> UserError:
    """The error for a file torch (or safetensors) cannot read; the type names what went wrong."""
    return UserError(f"cannot read {what} {path} ({type(err).__name__})")


def read_torch_file(path: str | Path, what: str = "checkpoint"):
    """Whatever the file holds, loaded on the CPU with `weights_only=True` (tensors + plain data)."""
    import torch

    require_file(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a file that is not a checkpoint
        raise unreadable(path, what, err) from None


def missing_keys(payload, keys: tuple[str, ...] = MODEL_KEYS) -> list[str]:
    """The `keys` a loaded file lacks (all of them when it is not a dict)."""
    return [key for key in keys if not (isinstance(payload, dict) and key in payload)]


def read_checkpoint(path: str | Path, keys: tuple[str, ...] = MODEL_KEYS) -> dict:
    """An mmssl checkpoint dict (`model`, `config`, ...; training resume asks for more `keys`)
    from a checkpoint file or a run folder."""
    if Path(path).is_dir():
        path = parse_ref(path).check().path
    payload = read_torch_file(path)
    missing = missing_keys(payload, keys)
    if missing:
        raise UserError(f"{path} is not an mmssl checkpoint (missing {', '.join(missing)})")
    return payload
