"""Reading an embeddings folder made by `mmssl embed`, as untrusted input.

The folder may come from anyone, so nothing it says is taken on trust: `embed_info.json` is read
up to a size bound and checked against a schema; every file it names must be one of the layout's
own names (`img_emb/img_emb_{part}.npy`, ..., never a path of its choosing), a regular file inside
the folder, of the recorded size and SHA-256; arrays must be 2-d float32 `[rows, dim]` with the
recorded rows and one dim for all; each metadata table has the part's rows, and its `shard` column
names only the part's own shards. Parts come back in their (sorted) order.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eval.embed_parts import FORMAT, INFO_FILE, file_sha256, part_files
from mmssl.errors import UserError

MAX_INFO_BYTES = 64 * 2**20
PART_NAME = re.compile(r"^[0-9]{1,12}$")


@dataclass
class EmbeddingPart:
    name: str
    shards: list
    image: np.ndarray            # [rows, dim] float32, memory-mapped
    text: np.ndarray | None      # [rows, dim] float32 with modality text
    metadata: object             # pyarrow.Table, row i describes row i of `image`


@dataclass
class EmbeddingFolder:
    root: Path
    info: dict
    parts: list

    @property
    def shards(self) -> list:
        return [shard for part in self.parts for shard in part.shards]


def is_embedding_folder(path) -> bool:
    return Path(path).is_dir() and (Path(path) / INFO_FILE).is_file()


def read_parts(folder) -> EmbeddingFolder:
    """The checked parts of an embeddings folder; UserError (one line) for anything amiss."""
    from mmssl.data.sources import read_json

    root = Path(folder)
    info_path = root / INFO_FILE
    if not info_path.is_file():
        raise UserError(f"{root}: no {INFO_FILE} (not a folder made by `mmssl embed`, or the run has not finished)")
    try:
        info = read_json(info_path, MAX_INFO_BYTES)
    except ValueError:
        raise UserError(f"{info_path}: not valid JSON") from None
    modalities, dim, parts = _check_info(info, info_path)
    real_root = root.resolve()
    read, names = [], set()
    for position, entry in enumerate(parts):
        where = f"{info_path}: part {position}"
        if not isinstance(entry, dict) or not isinstance(entry.get("part"), str) \
                or not PART_NAME.match(entry["part"]):
            raise UserError(f"{where}: needs a 'part' name of digits")
        name = entry["part"]
        if read and name <= read[-1].name:
            raise UserError(f"{where}: part {name} is out of order or repeated")
        names.add(name)
        rows, files, shards = entry.get("rows"), entry.get("files"), entry.get("shards")
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
            raise UserError(f"{where}: 'rows' must be a non-negative integer")
        if not isinstance(shards, list) or not all(isinstance(shard, str) for shard in shards):
            raise UserError(f"{where}: 'shards' must be a list of paths")
        expected = part_files(name, modalities)
        if not isinstance(files, dict) or set(files) != set(expected.values()):
            raise UserError(f"{where}: files must be exactly {sorted(expected.values())}")
        for relative, recorded in files.items():
            _check_file(real_root, relative, recorded, where)
        image = _load_array(root / expected["image"], rows, dim)
        text = _load_array(root / expected["text"], rows, dim) if "text" in modalities else None
        table = _load_table(root / expected["metadata"], rows, shards)
        read.append(EmbeddingPart(name, shards, image, text, table))
    if sum(part.image.shape[0] for part in read) != info.get("rows", -1):
        raise UserError(f"{info_path}: 'rows' is not the sum of the parts' rows")
    return EmbeddingFolder(root, info, read)


def _check_info(info, info_path: Path) -> tuple:
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise UserError(f"{info_path}: not an `mmssl embed` description (format must be {FORMAT!r})")
    modalities = info.get("modalities")
    if modalities not in (["image"], ["image", "text"]):
        raise UserError(f"{info_path}: 'modalities' must be [\"image\"] or [\"image\", \"text\"]")
    dim = info.get("dim")
    if not isinstance(dim, int) or isinstance(dim, bool) or not 0 < dim <= 65536:
        raise UserError(f"{info_path}: 'dim' must be an integer in 1..65536")
    parts = info.get("parts")
    if not isinstance(parts, list) or not parts:
        raise UserError(f"{info_path}: 'parts' must be a non-empty list")
    return tuple(modalities), dim, parts


def _check_file(root: Path, relative: str, recorded, where: str) -> None:
    """A regular file inside ROOT (symlinks resolved) with the recorded size and SHA-256."""
    path = root / relative
    if not isinstance(recorded, dict) or not isinstance(recorded.get("bytes"), int) \
            or not isinstance(recorded.get("sha256"), str):
        raise UserError(f"{where}: {relative} needs 'bytes' and 'sha256'")
    real = path.resolve()
    if not real.is_relative_to(root):
        raise UserError(f"{where}: {relative} points outside {root}")
    if not real.is_file():
        raise UserError(f"{where}: {relative} is missing")
    if real.stat().st_size != recorded["bytes"]:
        raise UserError(f"{where}: {relative} is {real.stat().st_size} bytes, not the recorded {recorded['bytes']} "
                        "(truncated or replaced)")
    if file_sha256(real) != recorded["sha256"]:
        raise UserError(f"{where}: {relative} does not match its recorded SHA-256 (changed or corrupt)")


def _load_array(path: Path, rows: int, dim: int) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as err:
        raise UserError(f"{path}: not a readable .npy file ({err})") from None
    if array.dtype != np.float32 or array.shape != (rows, dim):
        raise UserError(f"{path}: expected float32 {rows}x{dim}, got {array.dtype} {'x'.join(map(str, array.shape))}")
    return array


def _load_table(path: Path, rows: int, shards: list):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise UserError(f"{path}: not a readable parquet file ({err})") from None
    if table.num_rows != rows or "key" not in table.column_names or "caption" not in table.column_names:
        raise UserError(f"{path}: expected {rows} rows with 'key' and 'caption', got {table.num_rows} rows "
                        f"({', '.join(table.column_names)})")
    if "shard" in table.column_names:
        named = set(table.column("shard").to_pylist()) - {None}
        if not named <= set(shards):
            raise UserError(f"{path}: rows name shard {sorted(named - set(shards))[0]!r}, not one of the part's shards")
    return table


def concatenated(folder: EmbeddingFolder) -> tuple:
    """(image vectors, text vectors or None, metadata table) of all parts, in part order."""
    import pyarrow as pa

    image = np.concatenate([part.image for part in folder.parts])
    text = None
    if folder.parts[0].text is not None:
        text = np.concatenate([part.text for part in folder.parts])
    try:
        table = pa.concat_tables([part.metadata for part in folder.parts], promote_options="default")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise UserError(f"{folder.root}: the parts' metadata tables do not fit together ({err})") from None
    return image, text, table
