"""Images for the query grid: copy each retrieved image's bytes out of its shard into DIR/figures.

A copy (not a link into the shards) keeps the report readable when DIR/data is deleted or the
folder is moved. Where an image lives comes from the search result itself (the index metadata
row: `shard` + `image_offset` + `image_size`, or `image_path`), else from the index folder's
`metadata.parquet` looked up by key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from mmssl.errors import UserError

QUERY_FIGURES = Path("figures") / "queries"
IMAGE_FIELDS = ("shard", "image_offset", "image_size", "image_path")


def query_hits(search: dict, out: Path, number: int) -> list[dict]:
    """The search's results as {rank, score, caption, image (path relative to `out`)}."""
    hits = []
    missing = [r for r in search["results"] if not _has_location(r)]
    located = _lookup_by_key(Path(search.get("index") or out / "index"), [r["key"] for r in missing]) if missing else {}
    for rank, result in enumerate(search["results"], start=1):
        source = result if _has_location(result) else located.get(result["key"], {})
        data = read_image_bytes(source)
        if data is None:
            raise UserError(f"search result {result['key']!r} of query {search['query']!r} has no stored image")
        relative = QUERY_FIGURES / f"query_{number:02d}_rank_{rank}{_suffix(data)}"
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        (out / relative).write_bytes(data)
        hits.append({"rank": rank, "score": float(result["score"]), "caption": result.get("caption", ""),
                     "image": relative.as_posix()})
    return hits


def read_image_bytes(row: dict) -> Optional[bytes]:
    """An image's bytes from its shard slice or its file (None when the row names neither)."""
    if row.get("shard") and row.get("image_offset") is not None:
        with open(row["shard"], "rb") as handle:
            handle.seek(int(row["image_offset"]))
            return handle.read(int(row["image_size"]))
    if row.get("image_path"):
        return Path(row["image_path"]).read_bytes()
    return None


def _has_location(row: dict) -> bool:
    return bool(row.get("shard") and row.get("image_offset") is not None) or bool(row.get("image_path"))


def _lookup_by_key(index_dir: Path, keys: list) -> dict:
    import pyarrow.parquet as pq

    columns = ["key", *[name for name in IMAGE_FIELDS if name in pq.read_schema(index_dir / "metadata.parquet").names]]
    table = pq.read_table(index_dir / "metadata.parquet", columns=columns).to_pylist()
    wanted = set(keys)
    return {row["key"]: row for row in table if row["key"] in wanted}


def _suffix(data: bytes) -> str:
    return ".png" if data.startswith(b"\x89PNG") else ".jpg"
