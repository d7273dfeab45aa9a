"""Turning what a user writes for `data.train` / `--data` into a list of shards with sample counts.

Why counts matter: the training loader sizes its epoch from them (nobody passes a sample count)
and splits samples evenly over ranks and workers, so a known count per shard is worth looking
for in every place the common tools leave one:

* a folder with `manifest.json` (mmssl's own prep): `shards: [{"url"|"name", "count"}]`;
* an img2dataset output folder: `*.tar` with `{shard}_stats.json` beside each (`successes`);
* a brace pattern `dir/{00000..00009}.tar`: `_stats.json` beside each tar, else a `manifest.json`
  or webdataset's `sizes.json` in the shards' folder, else unknown (None);
* several sources: a Python list, or one string joined with `::` (open_clip's convention);
* a CLIP_benchmark folder (`ROOT/test/nshards.txt` + `0.tar`...; see `mmssl.data.benchmark_layout`):
  its `split` (default `test`), counts unknown; each shard carries the split it belongs to.

Local paths are checked here, so a typo fails with one line instead of a worker traceback. This
is also the one gate for what data may name (see `mmssl.data.urls`): every shard URL is checked
(no `pipe:`; remote only with `allow_remote`), a manifest's entries must stay inside the
manifest's folder, and manifests and stats files are read only up to a size bound.
"""
from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence, Union

import braceexpand

from mmssl.data.benchmark_layout import BenchmarkSplit, find_split, join
from mmssl.data.tar_reader import split_sample_name
from mmssl.data.urls import check_url, is_remote, local_path, scheme_of
from mmssl.errors import UserError

SourceSpec = Union[str, Path, Sequence[Union[str, Path]]]
MAX_JSON_BYTES = 64 * 2**20   # a manifest of a million shards is ~60 MB; anything bigger is not one


@dataclass(frozen=True)
class Shard:
    """One tar file: where it is, how many samples it holds (None: unknown), which source it is from,
    and the CLIP_benchmark split it belongs to (None for other shards), whose format its samples follow."""

    url: str
    count: Optional[int]
    source: int = 0
    benchmark: Optional[BenchmarkSplit] = None


def split_sources(spec: SourceSpec) -> list[str]:
    """The individual sources in a spec: a list of them, or one string joined with `::`."""
    items = [spec] if isinstance(spec, (str, Path)) else list(spec)
    sources = [part for item in items for part in str(item).split("::") if part.strip()]
    if not sources:
        raise UserError("no data source given")
    return sources


def resolve_shards(spec: SourceSpec, need_counts: bool = False, allow_remote: bool = False,
                   split: Optional[str] = None) -> list[Shard]:
    """All shards of one or several sources, in a stable order, each tagged with its source index.

    With `need_counts`, unknown counts of local tars are found by reading the tar headers, and a
    remote shard without a count is an error (the training loader needs every count). Remote
    URLs are refused unless `allow_remote`; `pipe:` and unknown schemes always are. `split` picks
    the split of a CLIP_benchmark folder (default `test`); for any other source it is an error.
    """
    return [shard for group in resolve_sources(spec, need_counts, allow_remote, split) for shard in group]


def resolve_sources(spec: SourceSpec, need_counts: bool = False, allow_remote: bool = False,
                    split: Optional[str] = None) -> list[list[Shard]]:
    """Like `resolve_shards`, grouped per source (for per-source sampling weights)."""
    groups = []
    for index, source in enumerate(split_sources(spec)):
        check_url(source, allow_remote, "the data source")
        benchmark = find_split(source, split)
        if benchmark is not None:
            shards = [Shard(url, None, index, benchmark) for url in _benchmark_urls(source, benchmark)]
        elif split is not None:
            raise UserError(f"--split {split} applies to CLIP_benchmark folders (ROOT/SPLIT/nshards.txt); "
                            f"{source} is not one")
        else:
            shards = [Shard(url, count, index) for url, count in _resolve_one(source, allow_remote)]
        if need_counts:
            shards = [_with_count(shard) for shard in shards]
        groups.append(shards)
    return groups


def total_samples(shards: Sequence[Shard]) -> Optional[int]:
    """Sum of the counts, or None when any count is unknown."""
    if any(shard.count is None for shard in shards):
        return None
    return sum(shard.count for shard in shards)


def _resolve_one(source: str, allow_remote: bool) -> list[tuple[str, Optional[int]]]:
    if "{" in source:
        return _from_pattern(source, allow_remote)
    if is_remote(source):
        return [(source, None)]
    path = local_path(source)
    if not path.exists():
        raise UserError(f"data source not found: {source}")
    if path.is_dir():
        if (path / "manifest.json").is_file():
            return _from_manifest(path / "manifest.json", allow_remote)
        return _from_folder(path)
    if path.name.endswith(".json"):
        return _from_manifest(path, allow_remote)
    return [(str(path), _count_beside(path))]


def _from_manifest(manifest: Path, allow_remote: bool) -> list[tuple[str, Optional[int]]]:
    try:
        entries = read_json(manifest)["shards"]
        if not isinstance(entries, list):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{manifest}: not a shard manifest (needs a 'shards' list)") from None
    shards = []
    for position, entry in enumerate(entries):
        name = (entry.get("url") or entry.get("name")) if isinstance(entry, dict) else entry
        if not name or not isinstance(name, str):
            raise UserError(f"{manifest}: shard entry {position} has no 'url' or 'name': {str(entry)[:200]!r}")
        where = f"{manifest}, shard entry {position}"
        check_url(name, allow_remote, where)
        url = name if is_remote(name) else str(_inside(manifest.parent, name, where))
        count = entry.get("count") if isinstance(entry, dict) else None
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
            raise UserError(f"{where}: count must be a non-negative integer, got {str(count)[:50]!r}")
        shards.append((url, count))
    if not shards:
        raise UserError(f"no shards listed in {manifest}")
    _require_local_files([url for url, _ in shards], str(manifest))
    return shards


def _benchmark_urls(source: str, benchmark: BenchmarkSplit) -> list[str]:
    """The split's shard URLs; local ones must exist and stay inside the folder the user named."""
    urls = [join(benchmark.folder, name) for name in benchmark.shard_names]
    if is_remote(benchmark.folder):
        return urls
    where = join(benchmark.folder, "nshards.txt")
    given = local_path(source)
    urls = [str(_inside(given, os.path.relpath(url, given), where, "the folder named")) for url in urls]
    _require_local_files(urls, where)
    return urls


def _inside(folder: Path, name: str, where: str, owner: str = "the manifest's folder") -> Path:
    """`folder / name`, refused unless it stays inside `folder` (symlinks followed): a manifest
    names its own shards, never other files on the machine."""
    if scheme_of(name) == "file" or os.path.isabs(name):
        raise UserError(f"{where}: {name!r} is an absolute path; a manifest names its shards relative to its folder")
    path = folder / name
    root = folder.resolve()
    if not path.resolve().is_relative_to(root):
        raise UserError(f"{where}: {name!r} points outside {owner} {root}")
    return path


def read_json(path: Path, limit: Optional[int] = None):
    """A JSON file of at most `limit` bytes (default `MAX_JSON_BYTES`): UserError for a bigger
    one, read no further than the limit; ValueError for malformed JSON."""
    limit = MAX_JSON_BYTES if limit is None else limit
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"{path} is over {limit} bytes: not a manifest or stats file")
    return json.loads(data)


def _from_folder(folder: Path) -> list[tuple[str, Optional[int]]]:
    """A folder without a manifest, e.g. img2dataset output: every tar, counts from its stats."""
    tars = sorted(folder.glob("*.tar"))
    if not tars:
        raise UserError(f"no shards in {folder} (no manifest.json and no .tar files)")
    sizes = _sizes_file(folder)
    return [(str(tar), _count_beside(tar, sizes)) for tar in tars]


def _from_pattern(pattern: str, allow_remote: bool) -> list[tuple[str, Optional[int]]]:
    urls = list(braceexpand.braceexpand(pattern))
    if not urls:
        raise UserError(f"brace pattern matches no shards: {pattern}")
    for url in urls:
        check_url(url, allow_remote, f"brace pattern {pattern}")
    if is_remote(pattern):
        return [(url, None) for url in urls]
    urls = [str(local_path(url)) for url in urls]
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
        if not is_remote(url) and not Path(url).is_file():
            raise UserError(f"shard not found: {url} (from {where})")


def _count_beside(tar: Path, sizes: Optional[dict] = None) -> Optional[int]:
    """`successes` from img2dataset's `{shard}_stats.json`, else the folder's sizes/manifest entry."""
    stats = tar.with_name(tar.name.removesuffix(".tar") + "_stats.json")
    if stats.is_file():
        try:
            return int(read_json(stats)["successes"])
        except (ValueError, KeyError, TypeError, OSError):
            pass
    if sizes is None:
        sizes = _sizes_file(tar.parent)
    return sizes.get(tar.name)


def _sizes_file(folder: Path) -> dict[str, int]:
    """Counts by tar file name from a folder's `manifest.json` or webdataset-style `sizes.json`."""
    manifest = folder / "manifest.json"
    if manifest.is_file():
        try:
            entries = read_json(manifest)["shards"]
            return {
                Path(entry.get("url") or entry.get("name")).name: int(entry["count"])
                for entry in entries
                if isinstance(entry, dict) and entry.get("count") is not None
            }
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            return {}
    sizes = folder / "sizes.json"
    if sizes.is_file():
        try:
            return {Path(name).name: int(count) for name, count in read_json(sizes).items()}
        except (ValueError, TypeError, AttributeError, OSError):
            return {}
    return {}


def _with_count(shard: Shard) -> Shard:
    if shard.count is not None:
        return shard
    if is_remote(shard.url):
        raise UserError(
            f"sample count unknown for {shard.url}: add a manifest.json, sizes.json or _stats.json"
        )
    return replace(shard, count=count_tar_samples(shard.url))


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
