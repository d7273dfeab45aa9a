"""What goes into an index: vectors, a metadata table aligned with them, and tuning queries.

Two sources, as in clip-retrieval: shards embedded with a model (images are indexed; their
captions, embedded with the text tower, are the tuning queries, since text-to-image is what the
index serves), or a precomputed embeddings `.npy` with an optional metadata parquet (the
vectors themselves are sampled as tuning queries). For a caption index (`--modality image,text`)
every row's caption embedding is kept too (`text_vectors`): from the shards' first caption, or
from a second `.npy` aligned with the first.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
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
    image_roots: list = field(default_factory=list)   # the only folders images may be served from
    text_vectors: np.ndarray | None = None            # [N, D] caption embeddings, for a caption index


def from_embeddings(embeddings: str | Path, metadata: str | Path | None = None,
                    image_roots: list | None = None, text_embeddings: str | Path | None = None) -> Collection:
    """`image_roots` (default: the metadata parquet's folder) bound where `image_path` files may
    be served from; relative image paths are taken relative to the parquet's folder.
    `text_embeddings`: row i is the caption embedding of row i of `embeddings`."""
    path = Path(embeddings)
    vectors = _load_vectors(path)
    text_vectors = None
    if text_embeddings is not None:
        text_vectors = _load_vectors(Path(text_embeddings))
        if text_vectors.shape != vectors.shape:
            raise UserError(f"{text_embeddings} is {text_vectors.shape[0]}x{text_vectors.shape[1]} but {path} is "
                            f"{vectors.shape[0]}x{vectors.shape[1]}: row i of both must describe item i")
    table = read_user_metadata(metadata, len(vectors)) if metadata else default_metadata(len(vectors))
    roots = []
    if metadata:
        base = Path(metadata).resolve().parent
        table = _absolute_image_paths(table, base)
        roots = _image_roots(image_roots or [str(base)], table)
    elif image_roots:
        roots = _image_roots(image_roots, table)
    source = {"embeddings": str(path.resolve()), "metadata": str(Path(metadata).resolve()) if metadata else None}
    if text_embeddings is not None:
        source["text_embeddings"] = str(Path(text_embeddings).resolve())
    return Collection(vectors, table, None, "sample of the indexed vectors", source, roots, text_vectors)


def _load_vectors(path: Path) -> np.ndarray:
    """A memory-mapped non-empty 2-d float .npy; UserError otherwise."""
    if not path.is_file():
        raise UserError(f"embeddings file not found: {path}")
    try:
        vectors = np.load(path, mmap_mode="r")
    except ValueError as err:
        raise UserError(f"{path}: not a readable .npy file ({err})") from None
    if vectors.ndim != 2 or len(vectors) == 0 or vectors.dtype.kind != "f":
        raise UserError(f"{path}: expected a non-empty 2-d float array, got {vectors.dtype} {vectors.shape}")
    return vectors


def _absolute_image_paths(table: pa.Table, base: Path) -> pa.Table:
    """`image_path` values made absolute (relative ones against `base`) and normalised."""
    if "image_path" not in table.column_names:
        return table
    paths = [os.path.normpath(base / value) if value else value
             for value in table.column("image_path").to_pylist()]
    return table.set_column(table.column_names.index("image_path"), "image_path", pa.array(paths, pa.string()))


def _image_roots(roots: list, table: pa.Table) -> list[str]:
    """The checked roots; UserError naming the first row whose image lies outside all of them."""
    from eval.index.stored_images import checked_roots, first_row_outside

    for root in roots:
        if not Path(root).is_dir():
            raise UserError(f"--image-root {root}: not a folder")
    resolved = checked_roots([str(Path(root).resolve()) for root in roots])
    shards = _column(table, "shard") if "image_offset" in table.column_names else None
    outside = first_row_outside(shards, _column(table, "image_path"), resolved)
    if outside is not None:
        i, what = outside
        raise UserError(f"metadata row {i} (key {table.column('key')[i].as_py()!r}) names {what}, outside the "
                        f"image roots {', '.join(resolved)}; pass --image-root DIR for each folder images may "
                        "be served from")
    return resolved


def _column(table: pa.Table, name: str) -> list | None:
    return table.column(name).to_pylist() if name in table.column_names else None


def from_shards(loaded, data: str, batch_size: int = 256, workers: int = 2, allow_remote: bool = False,
                text: bool = False) -> Collection:
    """Embed every image of the shards, and a sample of their first captions as tuning queries
    (with `text`: every first caption, kept as `text_vectors` for a caption index)."""
    from eval.embed import embed_images, embed_texts, open_eval_data
    from eval.index.shard_members import shard_members
    from eval.index.stored_images import image_roots_of_shards

    batches = open_eval_data(data, loaded.transform, batch_size=batch_size, workers=workers,
                             allow_remote=allow_remote)
    embedded = embed_images(loaded, batches, description="index images")
    members = {}
    for shard in getattr(batches, "shards", []):
        members.update(shard_members(shard.url))
    captions = [caps[0] if caps else "" for caps in embedded.captions]
    rows = [members.get(key, {}) for key in embedded.keys]
    table = shard_metadata_table(embedded.keys, captions, members, data)
    with_caption = [i for i, caption in enumerate(captions) if caption]
    if getattr(loaded.model, "text_free", None) and not text:
        with_caption = []   # an image-only model: tune on a sample of the indexed vectors, not captions
    if len(with_caption) > TUNING_QUERIES:
        picked = np.random.default_rng(0).choice(len(with_caption), size=TUNING_QUERIES, replace=False)
        with_caption = [with_caption[i] for i in sorted(picked)]
    text_vectors = None
    if text:
        text_vectors = embed_texts(loaded, captions, batch_size=batch_size, description="captions")[0]
        queries = text_vectors[with_caption] if with_caption else None
    else:
        queries = embed_texts(loaded, [captions[i] for i in with_caption], batch_size=batch_size,
                              description="captions")[0] if with_caption else None
    source = {"data": data, "skipped_corrupt": embedded.skipped, "expected": embedded.expected}
    query_source = "caption embeddings (text->image)" if queries is not None else "sample of the indexed vectors"
    roots = image_roots_of_shards(row.get("shard") for row in rows)
    return Collection(embedded.features, table, queries, query_source, source, roots, text_vectors)


def shard_metadata_table(keys: list, captions: list, members: dict, source: str) -> pa.Table:
    """The metadata of embedded shard samples: key, first caption, and where each image sits in its
    tar (`eval.index.shard_members`), with the sample's json."""
    rows = [members.get(key, {}) for key in keys]
    table = pa.table({
        "key": pa.array(keys, pa.string()),
        "caption": pa.array(captions, pa.string()),
        "shard": pa.array([row.get("shard") for row in rows], pa.string()),
        "image_offset": pa.array([row.get("image_offset") for row in rows], pa.int64()),
        "image_size": pa.array([row.get("image_size") for row in rows], pa.int64()),
        "json": pa.array([row.get("json") for row in rows], pa.string()),
    })
    return normalise_table(table, source)


def from_embedding_folder(folder: str | Path, image_roots: list | None = None, text: bool = False) -> Collection:
    """An `mmssl embed` folder (checked by `eval.embedding_parts.read_parts`): the img_emb parts
    concatenated in part order, their metadata tables, and with `text` the text_emb parts.
    Images may be served from `image_roots`, by default the folders of the shards the parts name."""
    from eval.embedding_parts import concatenated, read_parts

    read = read_parts(folder)
    vectors, text_vectors, table = concatenated(read)
    if text and text_vectors is None:
        raise UserError(f"{folder}: made without --modality image,text, so it holds no caption embeddings")
    table = normalise_table(table, str(folder))
    roots = _image_roots(image_roots or sorted({str(Path(shard).parent) for shard in read.shards}), table)
    source = {"embeddings": str(Path(folder).resolve()), "model": read.info.get("model"),
              "parts": len(read.parts)}
    return Collection(vectors, table, None, "sample of the indexed vectors", source, roots,
                      text_vectors if text else None)
