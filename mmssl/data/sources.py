"""Turning what a user writes for `data.train` / `--data` into a list of shards with sample counts.

Why counts matter: the training loader sizes its epoch from them (nobody passes a sample count)
and splits samples evenly over ranks and workers, so a known count per shard is worth looking
for in every place the common tools leave one:

* a folder with `manifest.json` (mmssl's own prep): `shards: [{"url"|"name", "count"}]`;
* an img2dataset output folder: `*.tar` with `{shard}_stats.json` beside each (`successes`);
* a brace pattern `dir/{00000..00009}.tar`: `_stats.json` beside each tar, else a `manifest.json`
  or webdataset's `sizes.json` in the shards' folder, else unknown (None);
* several sources: a Python list, or one string joined with `::` (open_clip's convention).

Local paths are checked here, so a typo fails with one line instead of a worker traceback.
"""
from __future__ import annotations

import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import braceexpand

from mmssl.data.tar_reader import split_sample_name
from mmssl.errors import UserError

SourceSpec = Union[str, Path, Sequence[Union[str, Path]]]
_REMOTE = re.compile(r"^[a-z][a-z0-9+]*:", re.IGNORECASE)  # http:, s3:, pipe:, gs: ...


@dataclass(frozen=True)
class Shard:
    """One tar file: where it is, how many samples it holds (None: unknown), which source it is from."""

    url: str
    count: Optional[int]
    source: int = 0


def split_sources(spec: SourceSpec) -> list[str]:
    """The individual sources in a spec: a list of them, or one string joined with `::`."""
    items = [spec] if isinstance(spec, (str, Path)) else list(spec)
    sources = [part for item in items for part in str(item).split("::") if part.strip()]
    if not sources:
        raise UserError("no data source given")
    return sources


def resolve_shards(spec: SourceSpec, need_counts: bool = False) -> list[Shard]:
    """All shards of one or several sources, in a stable order, each tagged with its source index.

    With `need_counts`, unknown counts of local tars are found by reading the tar headers, and a
    remote shard without a count is an error (the training loader needs every count).
    """
    return [shard for group in resolve_sources(spec, need_counts) for shard in group]


def resolve_sources(spec: SourceSpec, need_counts: bool = False) -> list[list[Shard]]:
    """Like `resolve_shards`, grouped per source (for per-source sampling weights)."""
    groups = []
    for index, source in enumerate(split_sources(spec)):
        shards = [Shard(url, count, index) for url, count in _resolve_one(source)]
        if need_counts:
            shards = [_with_count(shard) for shard in shards]
        groups.append(shards)
    return groups


def total_samples(shards: Sequence[Shard]) -> Optional[int]:
    """Sum of the counts, or None when any count is unknown."""
    if any(shard.count is None for shard in shards):
        return None
    return sum(shard.count for shard in shards)


def _resolve_one(source: str) -> list[tuple[str, Optional[int]]]:
    if "{" in source:
        return _from_pattern(source)
    if _REMOTE.match(source) and not source.startswith("file:"):
        return [(source, None)]
    path = Path(source.removeprefix("file://").removeprefix("file:")).expanduser()
    if not path.exists():
        raise UserError(f"data source not found: {source}")
    if path.is_dir():
        if (path / "manifest.json").is_file():
            return _from_manifest(path / "manifest.json")
        return _from_folder(path)
    if path.name.endswith(".json"):
        return _from_manifest(path)
    return [(str(path), _count_beside(path))]


def _from_manifest(manifest: Path) -> list[tuple[str, Optional[int]]]:
    try:
        entries = json.loads(manifest.read_text())["shards"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{manifest}: not a shard manifest (needs a 'shards' list)") from None
    shards = []
    for entry in entries:
        name = (entry.get("url") or entry.get("name")) if isinstance(entry, dict) else entry
        if not name:
            raise UserError(f"{manifest}: shard entry without 'url' or 'name': {entry!r}")
        url = name if _REMOTE.match(name) or Path(name).is_absolute() else str(manifest.parent / name)
        count = entry.get("count") if isinstance(entry, dict) else None
        shards.append((url, None if count is None else int(count)))
    if not shards:
        raise UserError(f"no shards listed in {manifest}")
    _require_local_files([url for url, _ in shards], str(manifest))
    return shards


def _from_folder(folder: Path) -> list[tuple[str, Optional[int]]]:
    """A folder without a manifest, e.g. img2dataset output: every tar, counts from its stats."""
    tars = sorted(folder.glob("*.tar"))
    if not tars:
        raise UserError(f"no shards in {folder} (no manifest.json and no .tar files)")
    sizes = _sizes_file(folder)
    return [(str(tar), _count_beside(tar, sizes)) for tar in tars]


def _from_pattern(pattern: str) -> list[tuple[str, Optional[int]]]:
    urls = list(braceexpand.braceexpand(pattern))
    if not urls:
        raise UserError(f"brace pattern matches no shards: {pattern}")
    if _REMOTE.match(pattern) and not pattern.startswith("file:"):
        return [(url, None) for url in urls]
    urls = [url.removeprefix("file://").removeprefix("file:") for url in urls]
    _require_local_files(urls, pattern)
    folder_sizes: dict[Path, dict] = {}
    shards = []
    for url in urls:
        path = Path(url)
        if path.parent not in folder_sizes:
            folder_sizes[path.parent] = _sizes_file(path.parent)
        shards.append((url, _count_beside(path, folder_sizes[path.parent])))
    return shards


def _require_local_files(urls: list[str], where: str) -> None:
    for url in urls:
        if not _REMOTE.match(url) and not Path(url).is_file():
            raise UserError(f"shard not found: {url} (from {where})")


def _count_beside(tar: Path, sizes: Optional[dict] = None) -> Optional[int]:
    """`successes` from img2dataset's `{shard}_stats.json`, else the folder's sizes/manifest entry."""
    stats = tar.with_name(tar.name.removesuffix(".tar") + "_stats.json")
    if stats.is_file():
        try:
            return int(json.loads(stats.read_text())["successes"])
        except (ValueError, KeyError, TypeError):
            pass
    if sizes is None:
        sizes = _sizes_file(tar.parent)
    return sizes.get(tar.name)


def _sizes_file(folder: Path) -> dict[str, int]:
    """Counts by tar file name from a folder's `manifest.json` or webdataset-style `sizes.json`."""
    manifest = folder / "manifest.json"
    if manifest.is_file():
        try:
            entries = json.loads(manifest.read_text())["shards"]
            return {
                Path(entry.get("url") or entry.get("name")).name: int(entry["count"])
                for entry in entries
                if isinstance(entry, dict) and entry.get("count") is not None
            }
        except (ValueError, KeyError, TypeError, AttributeError):
            return {}
    sizes = folder / "sizes.json"
    if sizes.is_file():
        try:
            return {Path(name).name: int(count) for name, count in json.loads(sizes.read_text()).items()}
        except (ValueError, TypeError, AttributeError):
            return {}
    return {}


def _with_count(shard: Shard) -> Shard:
    if shard.count is not None:
        return shard
    if _REMOTE.match(shard.url):
        raise UserError(
            f"sample count unknown for {shard.url}: add a manifest.json, sizes.json or _stats.json"
        )
    return Shard(shard.url, count_tar_samples(shard.url), shard.source)


def count_tar_samples(path: str | Path) -> int:
    """Samples in a local tar: distinct keys among its members, by the rule the reader groups
    with (reads headers, skips contents)."""
    keys = set()
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                parsed = split_sample_name(member.name) if member.isreg() else None
                if parsed is not None:
                    keys.add(parsed[0])
    except (tarfile.TarError, OSError) as err:
        raise UserError(f"cannot read shard {path}: {err}") from None
    return len(keys)
