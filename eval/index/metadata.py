"""Per-vector metadata in a parquet table whose row i describes FAISS id i.

Why parquet: columnar, typed, read in one call with pyarrow, and the format clip-retrieval and
img2dataset already use for metadata. Alignment is the one thing that must never silently break
(a shifted row shows every result with the wrong caption), so the index folder records the row
count and a SHA-256 over the keys in id order, and loading refuses a table that disagrees.

Columns: `key` and `caption` always; where the image can be served, either `shard` (tar path),
`image_offset` and `image_size` (the JPEG's bytes inside the tar) or `image_path` (a local file);
`url` (a remote image, clip-retrieval style) and `json` (the sample's json fields) when known.
Reading a stored image goes through `eval.index.stored_images`, which confines it to the roots
recorded at build time.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mmssl.errors import UserError

METADATA_FILE = "metadata.parquet"


def keys_checksum(keys) -> str:
    """SHA-256 over the keys in id order: any reordering, insertion or deletion changes it."""
    digest = hashlib.sha256()
    for key in keys:
        digest.update(str(key).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def read_user_metadata(path: str | Path, expected_rows: int) -> pa.Table:
    """A user's metadata parquet for an embeddings file: one row per vector, keys made unique strings."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"metadata file not found: {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise UserError(f"{path}: not a readable parquet file ({err})") from None
    if table.num_rows != expected_rows:
        raise UserError(f"{path} has {table.num_rows} rows but the embeddings have {expected_rows}: "
                        "row i must describe vector i")
    return normalise_table(table, str(path))


def default_metadata(num_rows: int) -> pa.Table:
    """Metadata for embeddings given without any: the row number is the key."""
    return pa.table({"key": [str(i) for i in range(num_rows)], "caption": [""] * num_rows})


def normalise_table(table: pa.Table, source: str) -> pa.Table:
    """Ensure string `key` (row numbers when absent) and `caption` columns, and unique keys."""
    if "key" in table.column_names:
        keys = [str(key) for key in table.column("key").to_pylist()]
        table = table.set_column(table.column_names.index("key"), "key", pa.array(keys, pa.string()))
    else:
        table = table.append_column("key", pa.array([str(i) for i in range(table.num_rows)], pa.string()))
    if "caption" not in table.column_names:
        captions = table.column("text").to_pylist() if "text" in table.column_names else [""] * table.num_rows
        table = table.append_column("caption", pa.array([c or "" for c in captions], pa.string()))
    keys = table.column("key").to_pylist()
    if len(set(keys)) != len(keys):
        raise UserError(f"{source}: keys are not unique ({len(keys) - len(set(keys))} duplicates)")
    return table


def write_metadata(out_dir: Path, table: pa.Table) -> str:
    """Write the table beside the index; returns the keys checksum to record in index_info.json."""
    pq.write_table(table, Path(out_dir) / METADATA_FILE)
    return keys_checksum(table.column("key").to_pylist())


@dataclass
class Metadata:
    """The metadata table held as Python lists for O(1) row access in the search service."""

    keys: list
    captions: list
    columns: dict              # every other column name -> list of values
    key_to_id: dict

    def __len__(self) -> int:
        return len(self.keys)

    def row(self, i: int) -> dict:
        record = {"key": self.keys[i], "caption": self.captions[i]}
        record.update({name: values[i] for name, values in self.columns.items()})
        return record


def load_metadata(index_dir: Path, expected_count: int, expected_checksum: str) -> Metadata:
    """Read metadata.parquet and check it lines up with the FAISS ids, or fail with one clear line."""
    path = Path(index_dir) / METADATA_FILE
    if not path.is_file():
        raise UserError(f"{index_dir}: no {METADATA_FILE} (not an index folder made by `mmssl index build`?)")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"{path}: not a readable parquet file ({str(err).splitlines()[0][:200]}); "
                        "rebuild the index") from None
    missing = [name for name in ("key", "caption") if name not in table.column_names]
    if missing:
        raise UserError(f"{path} has no {missing[0]!r} column: not the metadata of an index; rebuild the index")
    if table.num_rows != expected_count:
        raise UserError(f"{path} has {table.num_rows} rows but the index holds {expected_count} vectors: "
                        "metadata and index are out of step; rebuild the index")
    keys = table.column("key").to_pylist()
    if keys_checksum(keys) != expected_checksum:
        raise UserError(f"{path}: keys do not match the ids the index was built with (checksum differs); "
                        "rebuild the index")
    columns = {name: table.column(name).to_pylist() for name in table.column_names if name not in ("key", "caption")}
    return Metadata(keys, table.column("caption").to_pylist(), columns, {key: i for i, key in enumerate(keys)})
