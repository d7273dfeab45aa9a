"""Re-ranking retrieval with the ITM head: the dual encoder's cosine top-k, reordered by match score.

FAISS-style first stage, cross-attention second stage (ALBEF's retrieval protocol): for each query
the k best candidates by cosine similarity are scored by `mmssl.heads.itm.ITMHead` and reordered
by that score; everything below k keeps its cosine order. So recall@K for K >= k is the cosine
recall, and for K < k it is what the head makes of the top k.

Image tokens come from the embedding pass (`embed_images(..., keep_tokens=True)`); caption token
states are recomputed for the candidate captions, a chunk of queries at a time, so memory is
bounded by `pairs_per_chunk`.
"""
from __future__ import annotations

import numpy as np
import torch

from eval.metrics import metrics_from_ranks, retrieval_ranks
from mmssl.models.tower_tokens import text_tokens, text_valid

DEFAULT_K = 16
MAX_K = 256


def top_candidates(queries: np.ndarray, items: np.ndarray, k: int, rows_per_chunk: int = 1024) -> np.ndarray:
    """[Q, k] item indices by descending cosine score, ties broken by the lower index."""
    k = min(k, len(items))
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), rows_per_chunk):
        scores = queries[start:start + rows_per_chunk] @ items.T
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < len(items) else np.tile(np.arange(len(items)), (len(scores), 1))
        picked = np.take_along_axis(scores, part, axis=1)
        order = np.lexsort((part, -picked), axis=1)
        out[start:start + len(scores)] = np.take_along_axis(part, order, axis=1)
    return out


def reranked_ranks(candidates: np.ndarray, scores: np.ndarray, positive, cosine_ranks: np.ndarray) -> np.ndarray:
    """1-based rank of each query's best positive after reordering its candidates by `scores`
    (descending, stable): its new position when a positive is among them, else its cosine rank."""
    order = np.argsort(-scores, axis=1, kind="stable")
    reordered = np.take_along_axis(candidates, order, axis=1)
    hit = positive(reordered)                                   # [Q, k] bool
    found = hit.any(axis=1)
    return np.where(found, hit.argmax(axis=1) + 1, cosine_ranks)


class ItmPairScorer:
    """`(image_index [P], caption_index [P]) -> [P]` ITM match log-odds, from the embedding pass's
    image tokens and each chunk's captions encoded once (a caption repeated in the chunk is shared)."""

    def __init__(self, loaded, head, image_tokens: torch.Tensor, texts: list):
        self.loaded, self.head, self.image_tokens, self.texts = loaded, head, image_tokens, texts

    def __call__(self, image_index: np.ndarray, caption_index: np.ndarray) -> np.ndarray:
        from eval.embed import precision_context

        model, device = self.loaded.model, self.loaded.device
        unique, inverse = np.unique(caption_index, return_inverse=True)
        images, image_rows = np.unique(image_index, return_inverse=True)   # each distinct image's side once
        with torch.inference_mode(), precision_context(self.loaded):
            tokens = self.loaded.tokenizer([self.texts[i] for i in unique]).to(device)
            states, valid = text_tokens(model, tokens).tokens, text_valid(model, tokens)
            rows = torch.from_numpy(inverse.reshape(-1)).to(device)
            image_side = self.image_tokens[torch.from_numpy(images)].to(device)
            scores = self.head.match_score(image_side, states[rows], valid[rows],
                                           torch.from_numpy(image_rows.reshape(-1)).to(device))
        return scores.float().cpu().numpy()


def rerank_retrieval(image_features: np.ndarray, text_features: np.ndarray, text_to_image: np.ndarray, score,
                     k: int = DEFAULT_K, ks=(1, 5, 10), pairs_per_chunk: int = 2048) -> dict:
    """Retrieval metrics (`eval.metrics.retrieval_metrics`' names) after re-ranking each query's
    top `k` by `score(image_index, caption_index)` (higher: better match), both directions.
    Features are unit-norm, as `eval.embed` returns them."""
    text_cosine, image_cosine = retrieval_ranks(image_features, text_features, text_to_image)
    text_candidates = top_candidates(text_features, image_features, k)     # [M, k] images per caption
    image_candidates = top_candidates(image_features, text_features, k)    # [N, k] captions per image
    text_scores = _score_candidates(text_candidates, score, pairs_per_chunk, queries_are_images=False)
    image_scores = _score_candidates(image_candidates, score, pairs_per_chunk, queries_are_images=True)
    text_ranks = reranked_ranks(text_candidates, text_scores, lambda found: found == text_to_image[:, None],
                                text_cosine)
    image_rows = np.arange(len(image_features))[:, None]
    image_ranks = reranked_ranks(image_candidates, image_scores, lambda found: text_to_image[found] == image_rows,
                                 image_cosine)
    return metrics_from_ranks(text_ranks, image_ranks, ks)


def _score_candidates(candidates: np.ndarray, score, pairs_per_chunk: int, queries_are_images: bool) -> np.ndarray:
    """[Q, k] scores of each query against its candidates, a bounded chunk of pairs at a time."""
    queries, width = candidates.shape
    chunk = max(1, pairs_per_chunk // width)
    out = np.empty(candidates.shape, dtype=np.float32)
    for start in range(0, queries, chunk):
        stop = min(start + chunk, queries)
        query_index = np.repeat(np.arange(start, stop), width)
        item_index = candidates[start:stop].reshape(-1)
        pair = (query_index, item_index) if queries_are_images else (item_index, query_index)
        out[start:stop] = np.asarray(score(*pair), dtype=np.float32).reshape(stop - start, width)
    return out
