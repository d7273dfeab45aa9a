"""CLIP_benchmark's webdataset layout (its published `wds_*` sets), recognised in this one place.

    ROOT/test/0.tar ... ROOT/test/{n-1}.tar, ROOT/test/nshards.txt   (train/ and other splits alike)
    ROOT/classnames.txt                         one class name per line, in label order
    ROOT/zeroshot_classification_templates.txt  one prompt per line, `{c}` where the name goes
    ROOT/dataset_type.txt                       `retrieval`; absent (or `classification`): classification

A sample is keyed `s0000000`, ...: one image (`webp`, `png`, `jpg` or `jpeg`) and either `.cls`
(the label as text) or `.txt` (the captions, one per line; a newline inside a caption is written
as the two characters `\\n`, and read back here as a newline). `--data ROOT` reads ROOT's `test`
split unless told otherwise; a split folder (the one holding `nshards.txt`) may also be named
directly.

Every file of such a folder is untrusted input. Text files are read up to a size bound;
`nshards.txt` must hold one whole number in 1..MAX_SHARDS, and the shard names are built here from
it (`0.tar` ...), so the folder cannot name other files (`mmssl.data.sources` also checks that
each one stays inside the folder given). A remote ROOT (`https://`, `hf://`, ...) is read through
`mmssl.data.urls` only, and only with `allow_remote` — CLIP_benchmark's own reader fetches these
text files by running `curl` in a shell, which mmssl never does. `multilabel` sets are refused.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from mmssl.data.urls import is_remote, local_path, read_text
from mmssl.errors import UserError

DEFAULT_SPLIT = "test"
NSHARDS_FILE = "nshards.txt"
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
TYPE_FILE = "dataset_type.txt"
DATASET_TYPES = ("classification", "retrieval")
MAX_SHARDS = 100_000
MAX_SMALL_FILE_BYTES = 64                 # nshards.txt, dataset_type.txt
MAX_LIST_FILE_BYTES = 16 * 2**20          # classnames / templates: ImageNet-21k's names are ~0.4 MB
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HF_TREE = re.compile(r"^(https://huggingface\.co/datasets/[^/]+/[^/]+)/tree/(.+)$")


@dataclass(frozen=True)
class BenchmarkSplit:
    """One split of a CLIP_benchmark folder: where it is, its type, and its shards' names."""

    root: str           # the folder (or URL) holding classnames.txt, templates, dataset_type.txt
    split: str
    folder: str         # the split folder (or URL) holding the shards
    dataset_type: str   # "classification" | "retrieval"
    shard_names: tuple  # "0.tar", "1.tar", ...: in order, as CLIP_benchmark reads them

    def classnames(self) -> Optional[list[str]]:
        """ROOT/classnames.txt as a list (None when absent); a blank line inside it is an error,
        because every later name would be read with the wrong label."""
        text = read_text(join(self.root, CLASSNAMES_FILE), MAX_LIST_FILE_BYTES, missing_ok=True)
        if text is None:
            return None
        names = [line.strip() for line in text.splitlines()]
        while names and not names[-1]:
            names.pop()
        if not names:
            raise UserError(f"{join(self.root, CLASSNAMES_FILE)} is empty")
        if "" in names:
            raise UserError(f"{join(self.root, CLASSNAMES_FILE)}, line {names.index('') + 1}: empty class name")
        return names

    def templates(self) -> Optional[list[str]]:
        """ROOT/zeroshot_classification_templates.txt, blank lines left out (None when absent)."""
        text = read_text(join(self.root, TEMPLATES_FILE), MAX_LIST_FILE_BYTES, missing_ok=True)
        if text is None:
            return None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise UserError(f"{join(self.root, TEMPLATES_FILE)} is empty")
        return lines


def find_split(source: str, split: Optional[str] = None) -> Optional[BenchmarkSplit]:
    """The CLIP_benchmark split `source` names (a ROOT, read at `split` or `test`, or a split
    folder), else None. UserError for a malformed folder, a missing split, or a `split` that
    does not fit (a split folder named with another split). `source` has passed `check_url`."""
    if split is not None and not _SPLIT_NAME.fullmatch(split):
        raise UserError(f"--split must be a plain folder name, got {split[:80]!r}")
    if is_remote(source):
        return _remote_split(source, split) if _may_be_remote_root(source) else None
    path = local_path(source)
    if not path.is_dir() or (path / "manifest.json").exists():
        return None
    if (path / NSHARDS_FILE).is_file():          # a split folder, named directly
        if split is not None and split != path.name:
            raise UserError(f"{source} is the '{path.name}' split folder; name its parent folder to read "
                            f"split '{split}'")
        return _split_at(str(path.parent), path.name, str(path))
    wanted = split or DEFAULT_SPLIT
    if (path / wanted / NSHARDS_FILE).is_file():
        return _split_at(str(path), wanted, str(path / wanted))
    if is_root(path):
        have = sorted(child.name for child in path.iterdir() if (child / NSHARDS_FILE).is_file())
        raise UserError(f"{source} has no '{wanted}' split ({wanted}/{NSHARDS_FILE}); "
                        f"its splits: {', '.join(have) or 'none'} (pick one with --split)")
    return None


def is_root(path: Path) -> bool:
    """Whether a local folder looks like a CLIP_benchmark ROOT (its files, or a split folder)."""
    if not path.is_dir() or (path / "manifest.json").exists():
        return False
    if (path / TYPE_FILE).is_file() or (path / TEMPLATES_FILE).is_file():
        return True
    with os.scandir(path) as entries:  # d_type: no stat per entry of a folder of many shards
        return any(entry.is_dir() and (Path(entry.path) / NSHARDS_FILE).is_file() for entry in entries)


def default_split(source: str, split: str) -> Optional[str]:
    """`split` when `source` is a CLIP_benchmark ROOT (local, or a remote folder URL), else None:
    what the linear probe's `--train ROOT` uses to read ROOT's train split."""
    if is_remote(source):
        return split if _may_be_remote_root(source) else None
    path = local_path(source)
    return split if is_root(path) and not (path / NSHARDS_FILE).is_file() else None


def benchmark_captions(text: bytes) -> list[str]:
    """A `.txt` of this layout: one caption per line (lines split as CLIP_benchmark splits them),
    `\\n` inside a caption read back as the newline the writer escaped."""
    return [line.replace("\\n", "\n") for line in text.decode("utf-8").splitlines()]


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if is_remote(base) else str(Path(base) / name)


def _split_at(root: str, split: str, folder: str) -> BenchmarkSplit:
    count = _read_nshards(join(folder, NSHARDS_FILE))
    return BenchmarkSplit(root, split, folder, _read_type(root), tuple(f"{i}.tar" for i in range(count)))


def _read_nshards(url: str) -> int:
    text = read_text(url, MAX_SMALL_FILE_BYTES).strip()
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= MAX_SHARDS:
        raise UserError(f"{url} must hold the number of shards (1..{MAX_SHARDS}), got {text[:40]!r}")
    return int(text)


def _read_type(root: str) -> str:
    text = read_text(join(root, TYPE_FILE), MAX_SMALL_FILE_BYTES, missing_ok=True)
    kind = (text or "").strip().lower() or "classification"
    if kind == "multilabel":
        raise UserError(f"{join(root, TYPE_FILE)}: multilabel sets (.npy labels) are not supported; "
                        "mmssl evaluates single-label classification and retrieval")
    if kind not in DATASET_TYPES:
        raise UserError(f"{join(root, TYPE_FILE)} must say {' or '.join(DATASET_TYPES)}, got {kind[:40]!r}")
    return kind


def _may_be_remote_root(url: str) -> bool:
    """A remote URL that names a folder rather than a shard or a manifest."""
    return "{" not in url and not urlsplit(url).path.rstrip("/").endswith((".tar", ".json"))


def _remote_split(url: str, split: Optional[str]) -> BenchmarkSplit:
    """A remote ROOT: a Hugging Face page URL (`.../datasets/USER/REPO/tree/BRANCH`) reads its
    files from `.../resolve/BRANCH`; any other URL is the folder itself."""
    match = _HF_TREE.match(url.rstrip("/"))
    root = f"{match.group(1)}/resolve/{match.group(2)}" if match else url.rstrip("/")
    wanted = split or DEFAULT_SPLIT
    return _split_at(root, wanted, join(root, wanted))
