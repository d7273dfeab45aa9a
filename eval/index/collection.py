"""What goes into an index: vectors, a metadata table aligned with them, and tuning queries.

Two sources, as in clip-retrieval: shards embedded with a model (images are indexed; their
captions, embedded with the text tower, are the tuning queries, since text-to-image is what the
index serves), or a precomputed embeddings `.npy` with an optional metadata parquet (the
vectors themselves are sampled as tuning queries).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from eval.index.metadata import default_metadata, normalise_table, read_user_metadata
from mmssl.errors import UserError

TUNING_QUERIES = 2000    # half tune the search knob, half check it


@dataclass
class Collection:
    vectors: np.ndarray            # [N, D], possibly memory-mapped
    metadata: pa.Table             # row i describes vectors[i]
    queries: np.ndarray | None     # tuning queries (None: sample the vectors)
    query_source: str              # what the tuning queries are, for index_info.json
    source: dict                   # recorded in index_info.json


def from_embeddings(embeddings: str | Path, metadata: str | Path | None = None) -> Collection:
    path = Path(embeddings)
    if not path.is_file():
        raise UserError(f"embeddings file not found: {path}")
    try:
        vectors = np.load(path, mmap_mode="r")
    except ValueError as err:
        raise UserError(f"{path}: not a readable .npy file ({err})") from None
    if vectors.ndim != 2 or len(vectors) == 0 or vectors.dtype.kind != "f":
        raise UserError(f"{path}: expected a non-empty 2-d float array, got {vectors.dtype} {vectors.shape}")
    table = read_user_metadata(metadata, len(vectors)) if metadata else default_metadata(len(vectors))
    source = {"embeddings": str(path.resolve()), "metadata": str(Path(metadata).resolve()) if metadata else None}
    return Collection(vectors, table, None, "sample of the indexed vectors", source)


def from_shards(loaded, data: str, batch_size: int = 256, workers: int = 2, allow_remote: bool = False) -> Collection:
    """Embed every image of the shards (and its first caption, as a tuning query)."""
    from eval.embed import embed_images, embed_texts, open_eval_data
    from eval.index.shard_members import shard_members

    batches = open_eval_data(data, loaded.transform, batch_size=batch_size, workers=workers,
                             allow_remote=allow_remote)
    embedded = embed_images(loaded, batches, description="index images")
    members = {}
    for shard in getattr(batches, "shards", []):
        members.update(shard_members(shard.url))
    captions = [caps[0] if caps else "" for caps in embedded.captions]
    rows = [members.get(key, {}) for key in embedded.keys]
    table = pa.table({
        "key": pa.array(embedded.keys, pa.string()),
        "caption": pa.array(captions, pa.string()),
        "shard": pa.array([row.get("shard") for row in rows], pa.string()),
        "image_offset": pa.array([row.get("image_offset") for row in rows], pa.int64()),
        "image_size": pa.array([row.get("image_size") for row in rows], pa.int64()),
        "json": pa.array([row.get("json") for row in rows], pa.string()),
    })
    table = normalise_table(table, data)
    texts = [caption for caption in captions if caption]
    if len(texts) > TUNING_QUERIES:
        picked = np.random.default_rng(0).choice(len(texts), size=TUNING_QUERIES, replace=False)
        texts = [texts[i] for i in sorted(picked)]
    queries = embed_texts(loaded, texts, batch_size=batch_size, description="captions")[0] if texts else None
    source = {"data": data, "skipped_corrupt": embedded.skipped, "expected": embedded.expected}
    query_source = "caption embeddings (text->image)" if queries is not None else "sample of the indexed vectors"
    return Collection(embedded.features, table, queries, query_source, source)
