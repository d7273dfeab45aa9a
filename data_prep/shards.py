"""The on-disk dataset: img2dataset-style tar shards, per-shard stats, manifest and failures.

Layout of one dataset folder:
    00000.tar            {key}.jpg / {key}.txt / {key}.json per sample (key = shard + row-in-shard)
    00000_stats.json     img2dataset's count (rows tried) and successes, plus this shard's failures
    manifest.json        shards with counts, totals, image size, source, failure count
    sizes.json           {"00000.tar": count, ...}: what open_clip's loader reads for dataset size
    failures.jsonl       one line per row that did not become a sample, with its reason

Why atomic writes: a killed run must never leave a half-written `.tar`. Every file is written
under a `.tmp` name and renamed; a shard counts as finished only once both its tar and its stats
exist, so `--resume` redoes exactly the unfinished shards. Tar members carry fixed metadata
(mtime, owner, mode), so the same rows always give byte-identical shards.
"""
from __future__ import annotations

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


def _tar_member(name: str, data: bytes) -> bytes:
    """One regular-file member of a POSIX ustar archive: 512-byte header, data, zero padding.

    Why not tarfile: its general header code costs ~100 us per member, more than rendering a
    64 px sample; this fixed header (name, size, checksum vary) is the same format, read by
    tarfile, GNU tar and webdataset alike.
    """
    encoded = name.encode("utf-8")
    if len(encoded) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name}")
    header = bytearray(512)
    header[0:len(encoded)] = encoded
    header[100:108] = b"0000444\0"                            # mode r--r--r--
    header[108:116] = header[116:124] = b"0000000\0"          # uid, gid
    header[124:136] = b"%011o\0" % len(data)                  # size
    header[136:148] = b"%011o\0" % _FIXED_MTIME               # mtime
    header[148:156] = b" " * 8                                # checksum counts as spaces while summed
    header[156:157] = b"0"                                    # regular file
    header[257:265] = b"ustar\x0000"                          # POSIX ustar magic + version
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + data + bytes(-len(data) % 512)


def _tar_end(written: int) -> bytes:
    """Two zero blocks close the archive; pad to a whole 10240-byte record like tar does."""
    end = written + 1024
    return bytes(1024 + (-end % tarfile.RECORDSIZE))


def sample_members(key: str, sample) -> bytes:
    """A sample's three tar members ({key}.jpg, .txt, .json), ready to append to a shard."""
    meta = _json_text({"key": key, **sample.meta}).encode("utf-8")
    return (_tar_member(f"{key}.jpg", sample.jpg) + _tar_member(f"{key}.txt", sample.txt.encode("utf-8"))
            + _tar_member(f"{key}.json", meta))


def write_shard(out_dir: Path, shard: int, members: list, stats: dict) -> None:
    """Write the samples' member bytes (see sample_members) as one tar, then its stats; tar first."""
    tar_path = out_dir / shard_name(shard)
    tmp = tar_path.with_name(tar_path.name + TMP_SUFFIX)
    with open(tmp, "wb") as out:
        written = sum(out.write(blob) for blob in members)
        out.write(_tar_end(written))
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
    sizes = {shard_name(stats["shard"]): stats["successes"] for stats in all_stats}
    atomic_write_text(out_dir / SIZES, _json_text(sizes) + "\n")
    manifest = {
        "format": "webdataset",
        "version": FORMAT_VERSION,
        "source": source,
        "image_size": image_size,
        "shard_size": shard_size,
        "shards": [
            {"name": shard_name(s["shard"]), "url": shard_name(s["shard"]), "count": s["successes"], "rows": s["count"]}
            for s in all_stats
        ],
        "num_rows": sum(s["count"] for s in all_stats),
        "num_samples": sum(s["successes"] for s in all_stats),
        "num_failures": len(failures),
        "failures": FAILURES,
        **(extra or {}),
    }
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False, default=str) + "\n")
    return manifest


def write_lines(path: Path, lines) -> None:
    """classnames.txt / templates.txt: one entry per line."""
    atomic_write_text(path, "".join(f"{line}\n" for line in lines))
