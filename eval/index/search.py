"""Searching an index folder by text, image or vector: embed the query, search FAISS, attach metadata.

Shared by `mmssl index search` and `mmssl serve`, so both return the same hits in the same order.
`modality` says what is searched ("image": the image index, "text": the caption index of a
folder built with `--modality image,text`), whatever the query is, as in clip-retrieval.
`deduplicate` drops hits that are near-duplicates of a better-ranked hit, judged on the indexed
vectors themselves (reconstructed from the index, so approximate for compressed indexes).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from eval.index.store import IndexFolder, load_index_folder
from mmssl.errors import UserError

DEDUP_THRESHOLD = 0.94     # clip-retrieval's cosine threshold for "the same image"
_DEDUP_BLOCK = 512         # rows compared at once: memory stays O(block * hits)


@dataclass
class Hit:
    rank: int
    score: float
    id: int
    key: str
    caption: str
    match: float | None = None    # the ITM head's log-odds, when the hits were re-ranked (eval.index.rerank)


class Searcher:
    """An index folder plus the query encoder of the model it was built with."""

    def __init__(self, folder: IndexFolder, encoder=None):
        self.folder = folder
        self.encoder = encoder

    @classmethod
    def open(cls, index_dir: str, encoders: dict | None = None) -> "Searcher":
        """`encoders` (model reference -> QueryEncoder) lets several indexes of one model share it."""
        from eval.index.query import QueryEncoder

        folder = load_index_folder(index_dir)
        encoder = None
        if folder.model:
            encoders = {} if encoders is None else encoders
            if folder.model not in encoders:
                encoders[folder.model] = QueryEncoder.from_checkpoint(folder.model)
            encoder = encoders[folder.model]
            check_dimensions(folder, encoder)
        return cls(folder, encoder)

    @property
    def dim(self) -> int:
        return self.folder.info["dim"]

    def require_encoder(self):
        if self.encoder is None:
            raise UserError(f"{self.folder.path} was built from embeddings without --checkpoint: "
                            "it has no model to embed text or image queries")
        return self.encoder

    def search_vectors(self, vectors: np.ndarray, k: int, modality: str = "image") -> list[list[Hit]]:
        """Top-k hits per query row (fewer when the index holds fewer than k vectors)."""
        index = self.folder.index_for(modality)
        scores, ids = index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
        metadata = self.folder.metadata
        return [[Hit(rank + 1, float(score), int(i), metadata.keys[i], metadata.captions[i])
                 for rank, (score, i) in enumerate(zip(row_scores, row_ids)) if i >= 0]
                for row_scores, row_ids in zip(scores, ids)]

    def search_texts(self, texts: list[str], k: int, modality: str = "image") -> list[list[Hit]]:
        return self.search_vectors(self.require_encoder().encode_texts(texts), k, modality)

    def search_images(self, images: list, k: int, modality: str = "image") -> list[list[Hit]]:
        return self.search_vectors(self.require_encoder().encode_images(images), k, modality)

    def deduplicate(self, hits: list[Hit], modality: str = "image",
                    threshold: float = DEDUP_THRESHOLD) -> list[Hit]:
        """`hits` without those whose indexed vector has cosine >= threshold with the vector of a
        better-ranked hit (kept or dropped), ranks renumbered."""
        if len(hits) < 2:
            return hits
        vectors = reconstruct(self.folder.index_for(modality), [hit.id for hit in hits])
        duplicate = near_duplicates(vectors, threshold)
        kept = [hit for hit, dup in zip(hits, duplicate) if not dup]
        return [dataclasses.replace(hit, rank=rank + 1) for rank, hit in enumerate(kept)]



def near_duplicates(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """[N] bool: row i has cosine >= threshold with some row j < i (rows are normalised here)."""
    rows = np.asarray(vectors, dtype=np.float32)
    rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    duplicate = np.zeros(len(rows), dtype=bool)
    for start in range(1, len(rows), _DEDUP_BLOCK):
        block = rows[start:start + _DEDUP_BLOCK]
        sims = block @ rows[:start + len(block)].T              # [b, start + b]
        earlier = np.arange(start + len(block))[None, :] < np.arange(start, start + len(block))[:, None]
        duplicate[start:start + len(block)] = ((sims >= threshold) & earlier).any(axis=1)
    return duplicate


def reconstruct(index, ids: list[int]) -> np.ndarray:
    """The indexed vectors of `ids` ([len(ids), d]); IVF indexes get their id->list map on first use."""
    import faiss

    ids = np.asarray(ids, dtype=np.int64)
    try:
        return index.reconstruct_batch(ids)
    except RuntimeError:
        ivf = faiss.extract_index_ivf(index)   # IVF lists need a direct map to look ids up
        ivf.make_direct_map()
        return index.reconstruct_batch(ids)


def check_dimensions(folder: IndexFolder, encoder) -> None:
    """The model must embed into the index's space: catches a checkpoint swapped after building."""
    loaded = getattr(encoder, "loaded", None)
    if loaded is not None and getattr(loaded.model, "text_free", None):
        dim = loaded.model.visual.output_dim    # an image-only model: no text to embed
    else:
        dim = encoder.encode_texts([""]).shape[1]
    if dim != folder.info["dim"]:
        raise UserError(f"{folder.path}: the index holds {folder.info['dim']}-d vectors but its model "
                        f"{folder.model} embeds into {dim} dimensions")
