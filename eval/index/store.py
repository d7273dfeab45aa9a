"""The index folder: `index.faiss`, `metadata.parquet` and `index_info.json`, saved and loaded as one.

index_info.json says what was built and why (type, parameters, memory estimate, tuned search
knob, measured recall, timings), which model embeds queries (`model`: a checkpoint path or an
`openclip:` spec, or null for an index of foreign embeddings), and the row count and keys
checksum that tie the metadata rows to the FAISS ids. Loading re-checks all three counts and the
checksum, and re-applies the tuned search knob.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from eval.index.metadata import Metadata, load_metadata, write_metadata
from mmssl.errors import UserError

INDEX_FILE = "index.faiss"
INFO_FILE = "index_info.json"
FORMAT_VERSION = 1


@dataclass
class IndexFolder:
    index: object            # faiss.Index with the tuned search parameter applied
    metadata: Metadata
    info: dict
    path: Path

    @property
    def model(self) -> str | None:
        return self.info.get("model")


def save_index_folder(out_dir: str | Path, index, info: dict, metadata: pa.Table, model: str | None) -> dict:
    """Write the three files; returns the info dict as written (with file size and checksum)."""
    import faiss

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if metadata.num_rows != index.ntotal:
        raise ValueError(f"metadata has {metadata.num_rows} rows for {index.ntotal} vectors")
    faiss.write_index(index, str(out / INDEX_FILE))
    checksum = write_metadata(out, metadata)
    info = {"format_version": FORMAT_VERSION, **info, "model": model, "keys_sha256": checksum,
            "index_file_bytes": (out / INDEX_FILE).stat().st_size}
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def read_info(index_dir: str | Path) -> dict:
    path = Path(index_dir) / INFO_FILE
    if not path.is_file():
        raise UserError(f"{index_dir}: not an index folder (no {INFO_FILE}); build one with `mmssl index build`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg})") from None


def load_index_folder(index_dir: str | Path) -> IndexFolder:
    """Index, metadata and info, checked to line up; UserError naming the mismatch otherwise."""
    import faiss

    from eval.index.tune import set_search_param

    folder = Path(index_dir)
    info = read_info(folder)
    if not (folder / INDEX_FILE).is_file():
        raise UserError(f"{folder}: no {INDEX_FILE}")
    index = faiss.read_index(str(folder / INDEX_FILE))
    if index.ntotal != info["count"]:
        raise UserError(f"{folder}: {INDEX_FILE} holds {index.ntotal} vectors but {INFO_FILE} says "
                        f"{info['count']}; rebuild the index")
    metadata = load_metadata(folder, index.ntotal, info["keys_sha256"])
    search = info.get("search") or {}
    set_search_param(index, search.get("param"), search.get("value"))
    return IndexFolder(index, metadata, info, folder)
