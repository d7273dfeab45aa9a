"""A second stage for index searches: FAISS's candidates reordered by the model's ITM head.

Two directions have what the head needs: a text query over the image index (each candidate's
stored image is read through `StoredImages`, so only from the index's roots, and admitted like any
query image) and an image query over the caption index (each candidate's caption comes from the
metadata). Candidates are scored in one batch for all the queries handed over together (the
service's batches), hits are reordered by their match log-odds (`Hit.match`), ties and
candidates without a readable image keep their FAISS order, below the scored ones.

The image side of stored images (the head's cross-attention keys and values, computed once per
image) is cached, least recently used and bounded in bytes, since the same images come back for
many queries: a query then costs its caption's pass and the caption side of the head.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict

import torch

from mmssl.errors import UserError

MEMORY_CACHE_BYTES = 256 << 20
MAX_RERANK_K = 64


class NotRerankable(UserError):
    """The query / modality pair has no second stage (vectors, text over captions, image over images)."""


def rerankable(kind: str, modality: str) -> bool:
    return (kind, modality) in (("text", "image"), ("image", "text"))


class SearchReranker:
    def __init__(self, searcher, head, images, cache_bytes: int = MEMORY_CACHE_BYTES):
        self.searcher, self.head, self.images = searcher, head, images
        self.encoder = searcher.require_encoder()
        self.cache_bytes, self.cache_bytes_used = cache_bytes, 0
        self._memory: OrderedDict[int, list] = OrderedDict()

    @classmethod
    def for_searcher(cls, searcher, scorer: str = "itm") -> "SearchReranker":
        from eval.index.stored_images import StoredImages
        from mmssl.heads.saved import load_head

        if scorer != "itm":
            raise UserError(f"unknown re-ranker {scorer!r} (itm)")
        encoder = searcher.require_encoder()
        head = load_head(searcher.folder.model, "itm", encoder.loaded.model)
        return cls(searcher, head, StoredImages.for_folder(searcher.folder))

    def rerank(self, kind: str, queries: list, hits: list, modality: str = "image") -> list:
        """Each query's hits reordered by the ITM head; `queries` are texts, or image tensors
        from `QueryEncoder.prepare_image`."""
        if not rerankable(kind, modality):
            raise NotRerankable(f"re-ranking needs a text query over images or an image query over captions, "
                                f"not a {kind} query over {modality}s")
        from eval.embed import precision_context
        from mmssl.models.tower_tokens import image_tokens, text_tokens, text_valid

        loaded = self.encoder.loaded
        model, device = loaded.model, loaded.device
        pairs = [(q, hit) for q, query_hits in enumerate(hits) for hit in query_hits]
        with self.encoder._model_lock, torch.inference_mode(), precision_context(loaded):
            if kind == "text":    # distinct stored images once each; every pair points at its image
                memory_of = {hit.id: self._image_memory_of(hit.id) for _, hit in pairs}
                images = [row for row, memory in memory_of.items() if memory is not None]
                scored = [(q, hit) for q, hit in pairs if memory_of[hit.id] is not None]
                captions = [queries[q] for q, _ in scored]
                image_of = {row: i for i, row in enumerate(images)}
                image_index = [image_of[hit.id] for _, hit in scored]
                memory = [tuple(torch.stack([memory_of[row][block][part] for row in images]).to(device)
                                for part in (0, 1)) for block in range(len(self.head.fusion.blocks))] if images else None
            else:
                scored = pairs
                captions = [hit.caption for _, hit in scored]
                query_tokens = image_tokens(model.visual, torch.stack(queries).to(device)).tokens
                memory = self.head.fusion.image_memory(query_tokens)
                image_index = [q for q, _ in scored]
            matches = {}
            if scored:
                unique = list(dict.fromkeys(captions))      # each distinct caption through the text tower once
                tokens = loaded.tokenizer(unique).to(device)
                states, valid = text_tokens(model, tokens).tokens, text_valid(model, tokens)
                position = {caption: i for i, caption in enumerate(unique)}
                rows = torch.tensor([position[caption] for caption in captions], device=device)
                values = self.head.match_score(None, states[rows], valid[rows],
                                               torch.tensor(image_index, device=device), memory).float().cpu()
                matches = {(q, hit.rank): float(value) for (q, hit), value in zip(scored, values)}
        return [_reorder(query_hits, [matches.get((q, hit.rank)) for hit in query_hits])
                for q, query_hits in enumerate(hits)]

    def _image_memory_of(self, row: int):
        """The ITM head's image side (per block: keys, values) of stored image `row`, cached;
        None when it has no readable image."""
        if row in self._memory:
            self._memory.move_to_end(row)
            return self._memory[row]
        from mmssl.data.image_guard import ImageRefused
        from mmssl.models.tower_tokens import image_tokens

        stored = self.images.read(row)
        if stored is None:
            return None
        try:
            tensor = self.encoder.prepare_image(stored[0])
        except ImageRefused:
            return None
        loaded = self.encoder.loaded
        tokens = image_tokens(loaded.model.visual, tensor[None].to(loaded.device)).tokens
        memory = [(key[0].cpu(), value[0].cpu()) for key, value in self.head.fusion.image_memory(tokens)]
        self._remember(row, memory)
        return memory

    def _remember(self, row: int, memory: list) -> None:
        cost = _bytes(memory)
        if cost > self.cache_bytes:
            return
        self._memory[row] = memory
        self.cache_bytes_used += cost
        while self.cache_bytes_used > self.cache_bytes:
            _, old = self._memory.popitem(last=False)
            self.cache_bytes_used -= _bytes(old)


def _bytes(memory: list) -> int:
    return sum(part.numel() * part.element_size() for pair in memory for part in pair)


def _reorder(hits: list, matches: list) -> list:
    """Scored hits by descending match (stable: FAISS order on ties), then the unscored ones; ranks renumbered."""
    order = sorted(range(len(hits)), key=lambda i: (matches[i] is None, -(matches[i] or 0.0), i))
    return [dataclasses.replace(hits[i], rank=rank + 1, match=matches[i]) for rank, i in enumerate(order)]
