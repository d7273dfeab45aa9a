"""The on-disk dataset: img2dataset-style tar shards, per-shard stats, manifest and failures.

Layout of one dataset folder:
    00000.tar            {key}.jpg / {key}.txt / {key}.json per sample (key = shard + row-in-shard)
    00000_stats.json     img2dataset's count (rows tried) and successes, plus this shard's failures
    manifest.json        shards with counts, totals, image size, source, failure count
    sizes.json           {"00000.tar": count, ...}: what open_clip's loader reads for dataset size
    failures.jsonl       one line per row that did not become a sample, with its reason

Why atomic, durable writes: a killed run (or a crashed machine) must never leave a half-written
`.tar`. Every file goes through `atomic_write`: written under a `.tmp` name, fsynced, renamed, and
the folder fsynced, so what a rename made visible is also on disk. A shard counts as finished
only once both its tar and its stats exist, so `--resume` redoes exactly the unfinished shards.
A write that fails (disk full, file too large, no permission) is a UserError naming the file, and
its `.tmp` is removed: nothing finished before is touched. Tar members carry fixed metadata
(mtime, owner, mode), so the same rows always give byte-identical shards.
"""
from __future__ import annotations

import errno
import json
import os
import tarfile
from pathlib import Path

from mmssl.errors import UserError

from data_prep.samples import sample_meta

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


def atomic_write(path: Path, chunks) -> None:
    """Write the byte strings `chunks` as `path`: all of it or nothing, and on disk once it returns.

    The one place data_prep writes files. Any OSError becomes a UserError naming `path` (the
    `.tmp` is removed first), so a full disk stops the run with one line.
    """
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except OSError as err:
        _remove_quietly(tmp)
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, [text.encode("utf-8")])


def _fsync_folder(folder: Path) -> None:
    """Make a rename inside `folder` durable (filesystems that cannot fsync a folder are skipped)."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass  # already gone, or the folder itself is the problem (reported by the caller)


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
    """A sample's tar members ({key}.jpg, .txt, .json; no .txt for an image without caption),
    ready to append to a shard.

    The json's `key` is always the member key; a source field called `key` stays as `source_key`.
    """
    meta = _json_text(sample_meta(sample.meta, {"key": key})).encode("utf-8")
    caption = b"" if sample.txt is None else _tar_member(f"{key}.txt", sample.txt.encode("utf-8"))
    return _tar_member(f"{key}.jpg", sample.jpg) + caption + _tar_member(f"{key}.json", meta)


def write_shard(out_dir: Path, shard: int, members: list, stats: dict) -> None:
    """Write the samples' member bytes (see sample_members) as one tar, then its stats; tar first."""
    atomic_write(out_dir / shard_name(shard), [*members, _tar_end(sum(map(len, members)))])
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
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        entries = list(out_dir.iterdir())
    except OSError as err:
        raise UserError(f"cannot create output folder {out_dir}: {err.strerror or err}") from None
    if overwrite:
        stale = [path for path in entries if path.is_file() and _is_dataset_file(path)]
    elif resume:
        stale = [path for path in entries if path.name.endswith(TMP_SUFFIX)]
    elif entries:
        raise UserError(f"output folder {out_dir} is not empty; pass --resume to continue it or --overwrite to replace it")
    else:
        stale = []
    for path in stale:
        try:
            path.unlink()
        except OSError as err:
            raise UserError(f"cannot remove {path}: {err.strerror or err}") from None


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
