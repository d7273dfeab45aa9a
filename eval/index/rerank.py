"""A second stage for index searches: FAISS's candidates reordered by the model's ITM head.

Two directions have what the head needs: a text query over the image index (each candidate's
stored image is read through `StoredImages`, so only from the index's roots, and admitted like any
query image) and an image query over the caption index (each candidate's caption comes from the
metadata). Candidates are scored in one batch for all the queries handed over together (the
service's batches), hits are reordered by their match log-odds (`Hit.match`), ties and
candidates without a readable image keep their FAISS order, below the scored ones.

The image tokens of stored images are cached (least recently used, bounded in bytes), since the
same images come back for many queries.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict

import torch

from mmssl.errors import UserError

TOKEN_CACHE_BYTES = 64 << 20
MAX_RERANK_K = 64


class NotRerankable(UserError):
    """The query / modality pair has no second stage (vectors, text over captions, image over images)."""


def rerankable(kind: str, modality: str) -> bool:
    return (kind, modality) in (("text", "image"), ("image", "text"))


class SearchReranker:
    def __init__(self, searcher, head, images, cache_bytes: int = TOKEN_CACHE_BYTES):
        self.searcher, self.head, self.images = searcher, head, images
        self.encoder = searcher.require_encoder()
        self.cache_bytes, self.cache_bytes_used = cache_bytes, 0
        self._tokens: OrderedDict[int, torch.Tensor] = OrderedDict()

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
                tokens_of = {hit.id: self._image_tokens_of(hit.id) for _, hit in pairs}
                images = [row for row, tokens in tokens_of.items() if tokens is not None]
                scored = [(q, hit) for q, hit in pairs if tokens_of[hit.id] is not None]
                captions = [queries[q] for q, _ in scored]
                image_of = {row: i for i, row in enumerate(images)}
                image_index = [image_of[hit.id] for _, hit in scored]
                image_side = torch.stack([tokens_of[row] for row in images]).to(device) if images else None
            else:
                scored = pairs
                captions = [hit.caption for _, hit in scored]
                image_side = image_tokens(model.visual, torch.stack(queries).to(device)).tokens
                image_index = [q for q, _ in scored]
            matches = {}
            if scored:
                unique = list(dict.fromkeys(captions))      # each distinct caption through the text tower once
                tokens = loaded.tokenizer(unique).to(device)
                states, valid = text_tokens(model, tokens).tokens, text_valid(model, tokens)
                position = {caption: i for i, caption in enumerate(unique)}
                rows = torch.tensor([position[caption] for caption in captions], device=device)
                values = self.head.match_score(image_side, states[rows], valid[rows],
                                               torch.tensor(image_index, device=device)).float().cpu()
                matches = {(q, hit.rank): float(value) for (q, hit), value in zip(scored, values)}
        return [_reorder(query_hits, [matches.get((q, hit.rank)) for hit in query_hits])
                for q, query_hits in enumerate(hits)]

    def _image_tokens_of(self, row: int):
        """The cached or freshly computed tokens of stored image `row`; None when it has no readable image."""
        if row in self._tokens:
            self._tokens.move_to_end(row)
            return self._tokens[row]
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
        tokens = image_tokens(loaded.model.visual, tensor[None].to(loaded.device)).tokens[0].cpu()
        self._remember(row, tokens)
        return tokens

    def _remember(self, row: int, tokens: torch.Tensor) -> None:
        cost = tokens.numel() * tokens.element_size()
        if cost > self.cache_bytes:
            return
        self._tokens[row] = tokens
        self.cache_bytes_used += cost
        while self.cache_bytes_used > self.cache_bytes:
            _, old = self._tokens.popitem(last=False)
            self.cache_bytes_used -= old.numel() * old.element_size()


def _reorder(hits: list, matches: list) -> list:
    """Scored hits by descending match (stable: FAISS order on ties), then the unscored ones; ranks renumbered."""
    order = sorted(range(len(hits)), key=lambda i: (matches[i] is None, -(matches[i] or 0.0), i))
    return [dataclasses.replace(hits[i], rank=rank + 1, match=matches[i]) for rank, i in enumerate(order)]
