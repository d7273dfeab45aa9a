"""Adding items to an existing index folder without retraining or re-tuning it (`mmssl index add`).

The new vectors go through the same L2 normalisation as a build and are added, in chunks, to the
loaded index (and caption index), so their FAISS ids continue after the current count; their
metadata rows are appended in the same order, with the folder's columns. The trained parts
(IVF cells, PQ/SQ codebooks, the HNSW graph built so far) and the tuned search knob are kept: the
knob was tuned at build size, and `info["additions"]` records every growth so a reader can judge
how far the folder has moved from what was measured.

What must hold for the rows to mean anything: the same model (the checkpoint's canonical reference
equals `info["model"]`, or for bare embeddings the same dimension), caption vectors for a folder
that holds a caption index, and keys that are new (a repeated key would make `/image/{key}`
ambiguous). The grown folder is written through `store.save_index_folder` (staged beside it and
swapped in), so a failed or killed add leaves the previous version whole and readable, and a
running `mmssl serve` keeps answering from memory until it reloads.
"""
from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from eval.index.metadata import METADATA_FILE
from eval.index.store import load_index_folder, modalities_of, read_info, save_index_folder
from mmssl.errors import UserError

ON_DISK_FILE = "index.ivfdata"


def addable_info(index_dir: str | Path) -> dict:
    """The folder's index_info.json, after the checks that need no vectors: it exists, is an index
    folder, and is not an on-disk index (its inverted lists live in a file FAISS maps, which an
    add would have to rewrite in place)."""
    folder = Path(index_dir)
    if not folder.is_dir():
        raise UserError(f"--index {folder}: no such index folder")
    info = read_info(folder)
    if info.get("on_disk") or (folder / ON_DISK_FILE).exists():
        raise UserError(f"--index {folder} is an on-disk index: `mmssl index add` cannot grow it yet; "
                        "rebuild it with all the items")
    return info


def check_model(info: dict, model: str, index_dir) -> None:
    """UserError unless `model` (a canonical reference) is the one the folder was built with."""
    if info.get("model") != model:
        built = info.get("model") or "embeddings without a model"
        raise UserError(f"--index {index_dir}: index was built with {built}, not {model}")


def add_to_index(index_dir: str | Path, vectors: np.ndarray, metadata: pa.Table, source: dict,
                 text_vectors: np.ndarray | None = None, image_roots: list | None = None,
                 number_keys: bool = False, progress: bool = True) -> dict:
    """Append `vectors` (row i described by `metadata` row i; `text_vectors` row i its caption
    embedding, needed exactly when the folder holds a caption index) and write the grown folder;
    returns its info as written. `number_keys`: the rows have no keys of their own (embeddings
    without metadata), so they are numbered on from the current count, as a build numbers rows.
    `image_roots`: folders the new rows' images may be served from, added to the recorded ones."""
    from tqdm import tqdm

    from eval.index.build import CHUNK_ROWS, unit_chunks
    from eval.index.stored_images import checked_roots

    info = addable_info(index_dir)
    _check_shapes(info, vectors, metadata, text_vectors, index_dir)
    with _add_lock(Path(index_dir)):
        folder = load_index_folder(index_dir)      # checks every file against the info (again, under the lock)
        before = folder.info["count"]
        if number_keys:
            metadata = metadata.set_column(metadata.column_names.index("key"), "key",
                                           pa.array([str(before + i) for i in range(len(vectors))], pa.string()))
        _check_new_keys(metadata, folder.metadata.key_to_id)
        table = appended_metadata(pq.read_table(Path(index_dir) / METADATA_FILE), metadata, source_name(source))
        indexes = [(folder.index, vectors)] + ([(folder.text_index, text_vectors)] if text_vectors is not None else [])
        for index, rows in indexes:
            for chunk in tqdm(unit_chunks(rows), total=-(-len(rows) // CHUNK_ROWS), desc="adding", unit="chunk",
                              disable=not progress):
                if not np.isfinite(chunk).all():
                    raise UserError(f"{source_name(source)}: the vectors hold NaN or infinite values")
                index.add(chunk)
        grown = {key: value for key, value in folder.info.items() if key != "format_version"}
        grown["count"] = before + len(vectors)
        if isinstance(grown.get("text_index"), dict):
            grown["text_index"] = {**grown["text_index"], "count": grown["count"]}
        if image_roots:
            grown["image_roots"] = checked_roots(list(folder.info.get("image_roots") or []) + list(image_roots))
        previous = folder.info.get("additions")
        grown["additions"] = (previous if isinstance(previous, list) else []) + [{
            "count_before": before, "added": len(vectors), "source": source,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}]
        return save_index_folder(index_dir, folder.index, grown, table, folder.model, text_index=folder.text_index)


def _check_shapes(info: dict, vectors, metadata: pa.Table, text_vectors, index_dir) -> None:
    if vectors.ndim != 2 or len(vectors) == 0:
        raise UserError("nothing to add: the input holds no vectors")
    if vectors.shape[1] != info["dim"]:
        raise UserError(f"--index {index_dir} holds {info['dim']}-d vectors but the new ones are {vectors.shape[1]}-d")
    if metadata.num_rows != len(vectors):
        raise UserError(f"the metadata has {metadata.num_rows} rows for {len(vectors)} vectors: row i must "
                        "describe vector i")
    with_text = "text" in modalities_of(info)
    if with_text and text_vectors is None:
        raise UserError(f"--index {index_dir} also indexes captions (--modality image,text): give their "
                        "vectors too (--text-embeddings, or --data whose samples have captions)")
    if not with_text and text_vectors is not None:
        raise UserError(f"--index {index_dir} has no caption index: --text-embeddings has nowhere to go")
    if text_vectors is not None and text_vectors.shape != vectors.shape:
        raise UserError(f"the caption vectors are {text_vectors.shape} but the image vectors {vectors.shape}")


def _check_new_keys(metadata: pa.Table, known: dict) -> None:
    keys = metadata.column("key").to_pylist()
    taken = [key for key in keys if key in known]
    if taken:
        raise UserError(f"{len(taken)} of the {len(keys)} new keys are already in the index (first: {taken[0]!r}); "
                        "keys must be unique, or /image/{key} would be ambiguous")


def appended_metadata(existing: pa.Table, new: pa.Table, source: str) -> pa.Table:
    """`existing` with the rows of `new` after it, in `existing`'s schema: a column the new rows
    lack is null for them; a column only they have, or a value that does not convert, is an error."""
    extra = [name for name in new.column_names if name not in existing.column_names]
    if extra:
        raise UserError(f"{source}: column(s) {', '.join(extra[:5])} are not in the index's metadata "
                        f"({', '.join(existing.column_names)})")
    columns = []
    for field in existing.schema:
        if field.name not in new.column_names:
            columns.append(pa.nulls(new.num_rows, field.type))
            continue
        column = new.column(field.name)
        if column.type != field.type:
            try:
                column = column.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                raise UserError(f"{source}: column {field.name!r} is {column.type}, the index's is {field.type} "
                                f"({str(err).splitlines()[0]})") from None
        columns.append(column)
    return pa.concat_tables([existing, pa.Table.from_arrays(columns, schema=existing.schema)])


def source_name(source: dict) -> str:
    return str(source.get("data") or source.get("embeddings") or "the new items")


@contextmanager
def _add_lock(folder: Path):
    """One add at a time per folder (a second would grow the version the first replaces): an
    exclusive lock on `.NAME.lock` beside it, refused at once when held."""
    lock = folder.parent / f".{folder.name}.lock"
    handle = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"--index {folder}: another `mmssl index add` is writing it; retry when it ends") from None
        yield
    finally:
        os.close(handle)

