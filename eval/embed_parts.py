"""`mmssl embed`'s unit of work: one part = one shard (or `--shards-per-part` consecutive shards)
embedded into clip-retrieval's inference layout, written so that a killed run resumes to the same files.

Layout of OUT (what clip-retrieval's and autofaiss' index steps read; they sort file names, so part
names are zero-padded to one width, in manifest shard order):
`img_emb/img_emb_{part}.npy` (float32 [n, d], unit rows), `text_emb/text_emb_{part}.npy` (each sample's
first caption, with modality text), `metadata/metadata_{part}.parquet` (row i describes row i: key,
caption, shard, image_offset, image_size, json), `parts/{part}.json` (the part's record: settings,
shards, rows and each file's SHA-256, written last: a part is complete only when it exists and agrees
with its files), and `embed_info.json` (every part, written last of all by the driver).

Why the same bits on every engine: a part's batches are cut inside the part by the same loader
settings, and the encoders run with the same pinned torch thread count (`--threads`), whatever
process (this one, a Ray actor) runs the part. Each file goes to a temporary name then `os.replace`,
so a part is either whole or absent.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_prep.input_hash import file_sha256
from mmssl.errors import UserError

INFO_FILE = "embed_info.json"
FORMAT = "mmssl-embeddings/1"
PART_WIDTH = 5                      # part names like shard names: 00000, 00001, ... (sortable)
FOLDERS = {"image": "img_emb", "text": "text_emb"}
PREFIXES = {"image": "img_emb_", "text": "text_emb_"}


@dataclass(frozen=True)
class Settings:
    """What decides a part's bits: a part made with other settings is never reused."""

    model: str                   # canonical model reference
    modalities: tuple            # ("image",) or ("image", "text")
    precision: str               # as asked: auto | fp32 | bf16
    batch_size: int
    threads: int                 # torch intra-op threads while encoding
    workers: int                 # data loader processes (they decide where batches are cut)

    def record(self) -> dict:
        return {**asdict(self), "modalities": list(self.modalities)}


@dataclass(frozen=True)
class Part:
    name: str
    shards: tuple                # local tar paths, in manifest order


def plan_parts(data: str, shards_per_part: int) -> list[Part]:
    """The parts of a shard source: consecutive groups of `shards_per_part` shards in manifest order."""
    from mmssl.data.sources import resolve_shards

    if shards_per_part < 1:
        raise UserError(f"--shards-per-part must be >= 1, got {shards_per_part}")
    shards = [str(Path(shard.url).resolve()) for shard in resolve_shards(data)]
    groups = [tuple(shards[i:i + shards_per_part]) for i in range(0, len(shards), shards_per_part)]
    width = max(PART_WIDTH, len(str(len(groups) - 1)))
    return [Part(f"{i:0{width}d}", group) for i, group in enumerate(groups)]


def part_files(part: str, modalities) -> dict:
    """modality ("image", "text", "metadata") -> path relative to OUT."""
    files = {modality: f"{FOLDERS[modality]}/{PREFIXES[modality]}{part}.npy" for modality in modalities}
    files["metadata"] = f"metadata/metadata_{part}.parquet"
    return files


def record_path(out: Path, part: str) -> Path:
    return Path(out) / "parts" / f"{part}.json"


# --- one part --------------------------------------------------------------------------------


@contextmanager
def torch_threads(count: int):
    """torch's intra-op thread count pinned to `count` for the block (it changes reduction order)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def embed_part(loaded, part: Part, out: Path, settings: Settings) -> dict:
    """Embed one part's shards and write its files, then its record; returns the record."""
    from eval.embed import embed_images, embed_texts
    from mmssl.data import build_eval_loader
    from eval.index.collection import shard_metadata_table
    from eval.index.shard_members import shard_members

    start = time.perf_counter()
    out = Path(out)
    with torch_threads(settings.threads):
        batches = build_eval_loader(list(part.shards), transform=loaded.transform, batch_size=settings.batch_size,
                                    num_workers=settings.workers)
        try:
            embedded = embed_images(loaded, batches, description=f"part {part.name}")
        except UserError:
            raise UserError(f"part {part.name} ({', '.join(part.shards)}): no usable samples") from None
        members = {}
        for shard in part.shards:
            members.update(shard_members(shard))
        order = _shard_order(embedded.keys, members)
        keys = [embedded.keys[i] for i in order]
        captions = [embedded.captions[i][0] if embedded.captions[i] else "" for i in order]
        vectors = {"image": np.ascontiguousarray(embedded.features[order], dtype=np.float32)}
        if "text" in settings.modalities:
            vectors["text"] = embed_texts(loaded, captions, batch_size=settings.batch_size,
                                          description=f"part {part.name} captions")[0].astype(np.float32)
    table = shard_metadata_table(keys, captions, members, f"part {part.name}")
    files = part_files(part.name, settings.modalities)
    digests = {}
    for modality in settings.modalities:
        digests[files[modality]] = _write_atomic(out / files[modality], _npy_bytes(vectors[modality]))
    digests[files["metadata"]] = _write_atomic(out / files["metadata"], _parquet_bytes(table))
    record = {
        "part": part.name,
        "shards": list(part.shards),
        "rows": len(keys),
        "dim": int(vectors["image"].shape[1]),
        "skipped_corrupt": embedded.skipped,
        "precision": "bf16" if loaded.autocast_dtype is not None else "fp32",
        "settings": settings.record(),
        "files": digests,
        "worker": {"host": socket.gethostname(), "pid": os.getpid()},
        "seconds": round(time.perf_counter() - start, 3),
    }
    write_json_atomic(record_path(out, part.name), record)
    return record


def _shard_order(keys: list, members: dict) -> list:
    """Positions that put the loader's samples in the shards' own order (loader workers interleave)."""
    position = {key: i for i, key in enumerate(members)}
    return sorted(range(len(keys)), key=lambda i: position.get(keys[i], len(position) + i))


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _parquet_bytes(table) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _write_atomic(path: Path, data: bytes) -> dict:
    """Write `data` to PATH through a temporary name in its folder; returns {"bytes", "sha256"}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_json_atomic(path: Path, record: dict) -> None:
    _write_atomic(Path(path), (json.dumps(record, indent=2, sort_keys=True) + "\n").encode("utf-8"))


# --- the driver's view of OUT ------------------------------------------------------------------


def complete_record(out: Path, part: Part, settings: Settings) -> dict | None:
    """The part's record when the part is whole (record readable, same settings and shards, every file
    there with its recorded size and SHA-256), else None (the part is to be made again)."""
    path = record_path(out, part.name)
    try:
        record = json.loads(path.read_text())
        files = record["files"]
        if record["settings"] != settings.record() or record["shards"] != list(part.shards):
            return None
        if set(files) != set(part_files(part.name, settings.modalities).values()):
            return None
        for name, expected in files.items():
            target = Path(out) / name
            if target.stat().st_size != expected["bytes"] or file_sha256(target) != expected["sha256"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record


def check_same_job(out: Path, parts: list[Part], settings: Settings, overwrite: bool) -> None:
    """Refuse an OUT made with another model / precision / modalities or from other shards (as any
    part record or embed_info.json says) unless `overwrite`."""
    out = Path(out)
    if overwrite:
        return
    planned = {part.name: list(part.shards) for part in parts}
    for path in [out / INFO_FILE] + sorted((out / "parts").glob("*.json")):
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        made = found.get("settings") if isinstance(found, dict) else None
        if not isinstance(made, dict):
            continue
        for key in ("model", "modalities", "precision"):
            if made.get(key) != settings.record()[key]:
                raise UserError(f"{out} holds embeddings made with {key} {made.get(key)!r}, not "
                                f"{settings.record()[key]!r}; choose another --out or pass --overwrite")
        if "shards" in found and planned.get(found.get("part")) != found["shards"]:
            raise UserError(f"{out} holds part {found.get('part')} of other shards than --data's; "
                            "choose another --out or pass --overwrite")


def remove_stale(out: Path, parts: list[Part], settings: Settings) -> None:
    """Before a run: drop embed_info.json (rewritten at the end) and every layout file, record or
    temporary file of OUT that this plan does not name."""
    out = Path(out)
    wanted = {str(record_path(out, part.name)) for part in parts}
    for part in parts:
        wanted.update(str(out / name) for name in part_files(part.name, settings.modalities).values())
    (out / INFO_FILE).unlink(missing_ok=True)
    patterns = [("img_emb", "img_emb_*.npy"), ("text_emb", "text_emb_*.npy"),
                ("metadata", "metadata_*.parquet"), ("parts", "*.json")]
    for folder, pattern in patterns:
        for path in list((out / folder).glob(pattern)) + list((out / folder).glob(".*.tmp")):
            if str(path) not in wanted and path.is_file():
                path.unlink()


def write_info(out: Path, parts: list[Part], records: dict, settings: Settings, seconds: float) -> dict:
    """embed_info.json: the whole folder's description, from the part records, written last."""
    precisions = {records[part.name]["precision"] for part in parts}
    dims = {records[part.name]["dim"] for part in parts}
    if len(dims) != 1:
        raise UserError(f"parts disagree on the embedding dimension ({sorted(dims)})")
    info = {
        "format": FORMAT,
        "model": settings.model,
        "modalities": list(settings.modalities),
        "dim": dims.pop(),
        "precision": precisions.pop() if len(precisions) == 1 else sorted(precisions),
        "settings": settings.record(),
        "rows": sum(records[part.name]["rows"] for part in parts),
        "parts": [{key: records[part.name][key] for key in ("part", "shards", "rows", "files")} for part in parts],
        "timings_s": {"total": round(seconds, 3)},
    }
    write_json_atomic(Path(out) / INFO_FILE, info)
    return info
