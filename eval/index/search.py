"""Searching an index folder by text or image: embed the query, search FAISS, attach metadata.

Shared by `mmssl index search` and `mmssl serve`, so both return the same hits in the same order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eval.index.store import IndexFolder, load_index_folder
from mmssl.errors import UserError


@dataclass
class Hit:
    rank: int
    score: float
    id: int
    key: str
    caption: str


class Searcher:
    """An index folder plus the query encoder of the model it was built with."""

    def __init__(self, folder: IndexFolder, encoder=None):
        self.folder = folder
        self.encoder = encoder

    @classmethod
    def open(cls, index_dir: str) -> "Searcher":
        from eval.index.query import QueryEncoder

        folder = load_index_folder(index_dir)
        encoder = QueryEncoder.from_checkpoint(folder.model) if folder.model else None
        if encoder is not None:
            check_dimensions(folder, encoder)
        return cls(folder, encoder)

    def require_encoder(self):
        if self.encoder is None:
            raise UserError(f"{self.folder.path} was built from embeddings without --checkpoint: "
                            "it has no model to embed text or image queries")
        return self.encoder

    def search_vectors(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-k hits per query row (fewer when the index holds fewer than k vectors)."""
        scores, ids = self.folder.index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
        metadata = self.folder.metadata
        return [[Hit(rank + 1, float(score), int(i), metadata.keys[i], metadata.captions[i])
                 for rank, (score, i) in enumerate(zip(row_scores, row_ids)) if i >= 0]
                for row_scores, row_ids in zip(scores, ids)]

    def search_texts(self, texts: list[str], k: int) -> list[list[Hit]]:
        return self.search_vectors(self.require_encoder().encode_texts(texts), k)

    def search_images(self, images: list, k: int) -> list[list[Hit]]:
        return self.search_vectors(self.require_encoder().encode_images(images), k)


def check_dimensions(folder: IndexFolder, encoder) -> None:
    """The model must embed into the index's space: catches a checkpoint swapped after building."""
    dim = encoder.encode_texts([""]).shape[1]
    if dim != folder.info["dim"]:
        raise UserError(f"{folder.path}: the index holds {folder.info['dim']}-d vectors but its model "
                        f"{folder.model} embeds into {dim} dimensions")
