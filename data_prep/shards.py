"""The on-disk dataset: img2dataset-style tar shards, per-shard stats, manifest and failures.

Layout of one dataset folder:
    00000.tar            {key}.jpg / {key}.txt / {key}.json per sample (key = shard + row-in-shard)
    00000_stats.json     rows, written count and the failures of that shard
    manifest.json        shards with counts, totals, image size, source, failure count
    sizes.json           {"00000.tar": count, ...}: what open_clip's loader reads for dataset size
    failures.jsonl       one line per row that did not become a sample, with its reason

Why atomic writes: a killed run must never leave a half-written `.tar`. Every file is written
under a `.tmp` name and renamed; a shard counts as finished only once both its tar and its stats
exist, so `--resume` redoes exactly the unfinished shards. Tar members carry fixed metadata
(mtime, owner, mode), so the same rows always give byte-identical shards.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

from mmssl.errors import UserError

MANIFEST = "manifest.json"
FAILURES = "failures.jsonl"
SIZES = "sizes.json"
TMP_SUFFIX = ".tmp"
FORMAT_VERSION = 1
_FIXED_MTIME = 0  # reproducible tars: member times do not depend on when prep ran


def shard_name(shard: int) -> str:
    return f"{shard:05d}.tar"


def stats_name(shard: int) -> str:
    return f"{shard:05d}_stats.json"


def sample_key(shard: int, index_in_shard: int, shard_size: int) -> str:
    """img2dataset's key: 5-digit shard then the row's position in the shard (>= 4 digits)."""
    width = max(4, len(str(shard_size - 1)))
    return f"{shard:05d}{index_in_shard:0{width}d}"


def is_finished(out_dir: Path, shard: int) -> bool:
    return (out_dir / shard_name(shard)).is_file() and (out_dir / stats_name(shard)).is_file()


def read_stats(out_dir: Path, shard: int) -> dict:
    return json.loads((out_dir / stats_name(shard)).read_text())


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode("utf-8"))


def _json_text(obj) -> str:
    # default=str: metadata from parquet/JSONL may hold dates or decimals; keep them readable
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, default=str)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = _FIXED_MTIME
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(data))


def write_shard(out_dir: Path, shard: int, samples: list, stats: dict) -> None:
    """Write `samples` [(key, Sample)] as one tar, then its stats; both atomically, tar first."""
    tar_path = out_dir / shard_name(shard)
    tmp = tar_path.with_name(tar_path.name + TMP_SUFFIX)
    with open(tmp, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, sample in samples:
            _add_member(tar, f"{key}.jpg", sample.jpg)
            _add_member(tar, f"{key}.txt", sample.txt.encode("utf-8"))
            _add_member(tar, f"{key}.json", _json_text({"key": key, **sample.meta}).encode("utf-8"))
    os.replace(tmp, tar_path)
    atomic_write_text(out_dir / stats_name(shard), _json_text(stats) + "\n")


def _is_dataset_file(path: Path) -> bool:
    name = path.name
    return (
        name.endswith(TMP_SUFFIX)
        or name in (MANIFEST, FAILURES, SIZES, "classnames.txt", "templates.txt")
        or (name.endswith(".tar") and name[:-4].isdigit())
        or (name.endswith("_stats.json") and name[: -len("_stats.json")].isdigit())
    )


def prepare_output_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Create `out_dir`; refuse a non-empty one unless resuming or overwriting.

    --overwrite deletes only files a prep run writes (shards, stats, manifest, ...), never other files.
    --resume deletes only leftover `.tmp` files of a killed run.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output path {out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = list(out_dir.iterdir())
    if overwrite:
        for path in entries:
            if path.is_file() and _is_dataset_file(path):
                path.unlink()
    elif resume:
        for path in entries:
            if path.name.endswith(TMP_SUFFIX):
                path.unlink()
    elif entries:
        raise UserError(f"output folder {out_dir} is not empty; pass --resume to continue it or --overwrite to replace it")


def write_manifest(
    out_dir: Path, all_stats: list, *, source: dict, image_size, shard_size: int, extra: dict | None = None
) -> dict:
    """Gather per-shard stats into failures.jsonl, sizes.json and manifest.json (in shard order)."""
    failures = [record for stats in all_stats for record in stats["failures"]]
    atomic_write_text(out_dir / FAILURES, "".join(_json_text(record) + "\n" for record in failures))
    sizes = {shard_name(stats["shard"]): stats["count"] for stats in all_stats}
    atomic_write_text(out_dir / SIZES, _json_text(sizes) + "\n")
    manifest = {
        "format": "webdataset",
        "version": FORMAT_VERSION,
        "source": source,
        "image_size": image_size,
        "shard_size": shard_size,
        "shards": [
            {"name": shard_name(s["shard"]), "url": shard_name(s["shard"]), "count": s["count"], "rows": s["rows"]}
            for s in all_stats
        ],
        "num_rows": sum(s["rows"] for s in all_stats),
        "num_samples": sum(s["count"] for s in all_stats),
        "num_failures": len(failures),
        "failures": FAILURES,
        **(extra or {}),
    }
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False, default=str) + "\n")
    return manifest


def write_lines(path: Path, lines) -> None:
    """classnames.txt / templates.txt: one entry per line."""
    atomic_write_text(path, "".join(f"{line}\n" for line in lines))
