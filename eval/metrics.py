"""Classification and retrieval metrics with CLIP_benchmark's definitions, deterministic on ties.

Why our own: CLIP_benchmark ranks with `torch.topk`, whose order among equal scores is
unspecified, and its retrieval builds the full texts x images score matrix. Here every metric
derives from an exact 1-based *rank* with one tie rule everywhere -- among equal scores the
lower index comes first (a stable descending sort) -- so results are reproducible, and
retrieval streams over chunks of queries so memory stays bounded for 100k x 500k sets.

Tie rule in words: a class / item tied with the correct one ranks above it iff its index is lower.
`argmax` picks the first maximum, which is the same rule, so acc1 == mean(pred == label).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

DEFAULT_CHUNK_BYTES = 256 * 2**20  # one query chunk's score block; the only large temporary


def classification_metrics(logits, labels) -> dict:
    """{"acc1", "acc5", "mean_per_class_recall"} for scores `logits` [N, C] and int `labels` [N].

    acc5 is NaN when there are fewer than 5 classes (as in CLIP_benchmark). mean_per_class_recall
    is balanced accuracy: the recall of each class present in `labels`, averaged over those classes
    (sklearn's `balanced_accuracy_score`, which CLIP_benchmark calls).
    """
    logits = _as_numpy(logits, np.float32)
    labels = _as_numpy(labels, np.int64)
    _check_classification_inputs(logits, labels)
    ranks = class_ranks(logits, labels)
    return {
        "acc1": float(np.mean(ranks < 1)),
        "acc5": float(np.mean(ranks < 5)) if logits.shape[1] >= 5 else math.nan,
        "mean_per_class_recall": mean_per_class_recall(logits.argmax(axis=1), labels),
    }


def class_ranks(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """0-based rank of the true class in each row under the tie rule (0: the true class is top-1)."""
    true_scores = np.take_along_axis(logits, labels[:, None], axis=1)
    higher = np.count_nonzero(logits > true_scores, axis=1)
    lower_index = np.arange(logits.shape[1])[None, :] < labels[:, None]
    tied_before = np.count_nonzero((logits == true_scores) & lower_index, axis=1)
    return higher + tied_before


def mean_per_class_recall(predictions, labels) -> float:
    """Recall averaged over the classes that occur in `labels` (balanced accuracy)."""
    predictions, labels = _as_numpy(predictions, np.int64), _as_numpy(labels, np.int64)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    hits = np.bincount(inverse, weights=(predictions == labels), minlength=len(classes))
    return float(np.mean(hits / counts))


def per_class_counts(predictions, labels, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(correct top-1 predictions, samples) per class id 0..num_classes-1; recall = correct / samples."""
    predictions, labels = _as_numpy(predictions, np.int64), _as_numpy(labels, np.int64)
    support = np.bincount(labels, minlength=num_classes)
    correct = np.bincount(labels[predictions == labels], minlength=num_classes)
    return correct, support


def retrieval_metrics(
    image_features,
    text_features,
    text_to_image,
    ks: Sequence[int] = (1, 5, 10),
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict:
    """Recall@K both ways plus mean / median rank, on cosine similarity of the features.

    `text_to_image[j]` is the image that caption j describes; an image may have several captions.
    image_retrieval (text -> image): caption j hits at K when its image ranks in the top K.
    text_retrieval (image -> text): image i hits at K when ANY of its captions is in the top K,
    i.e. its best-ranked caption is. Ranks are 1-based; mean / median are over queries.
    """
    images, texts = _as_numpy(image_features, np.float32), _as_numpy(text_features, np.float32)
    owners = _as_numpy(text_to_image, np.int64)
    _check_retrieval_inputs(images, texts, owners, ks)
    images, texts = _normalised(images), _normalised(texts)

    return metrics_from_ranks(*retrieval_ranks(images, texts, owners, chunk_bytes), ks)


def retrieval_ranks(images: np.ndarray, texts: np.ndarray, owners: np.ndarray,
                    chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """(rank of each caption's image, rank of each image's best caption), 1-based, on unit features."""
    text_ranks = best_positive_ranks(texts, images, *_one_positive_each(owners), chunk_bytes)
    image_ranks = best_positive_ranks(images, texts, *_captions_by_image(owners, len(images)), chunk_bytes)
    return text_ranks, image_ranks


def metrics_from_ranks(text_ranks: np.ndarray, image_ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """CLIP_benchmark's recall@K names plus mean / median rank, from the ranks of both directions."""
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = float(np.mean(text_ranks <= k))
        metrics[f"text_retrieval_recall@{k}"] = float(np.mean(image_ranks <= k))
    for name, ranks in (("image_retrieval", text_ranks), ("text_retrieval", image_ranks)):
        metrics[f"{name}_mean_rank"] = float(np.mean(ranks))
        metrics[f"{name}_median_rank"] = float(np.median(ranks))
    return metrics


def best_positive_ranks(
    queries: np.ndarray,
    items: np.ndarray,
    indptr: np.ndarray,
    positives: np.ndarray,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> np.ndarray:
    """1-based rank, among all `items`, of each query's best-ranked positive (tie rule as above).

    Query q's positives are `positives[indptr[q]:indptr[q+1]]` (CSR layout, at least one each).
    Exact and memory-bounded: each chunk of queries is scored against all items (one matrix
    product of at most `chunk_bytes`), and the rank is 1 + #items scoring above the best positive
    + #items tied with it at a lower index. Every score compared comes from the same product, so
    ties are exact.
    """
    num_queries, num_items = len(queries), len(items)
    rows_per_chunk = max(1, min(num_queries, chunk_bytes // (4 * num_items)))
    ranks = np.empty(num_queries, dtype=np.int64)
    for start in range(0, num_queries, rows_per_chunk):
        stop = min(start + rows_per_chunk, num_queries)
        scores = queries[start:stop] @ items.T
        offsets = indptr[start:stop] - indptr[start]
        ranks[start:stop] = _ranks_in_chunk(scores, offsets, positives[indptr[start]:indptr[stop]])
    return ranks


def _ranks_in_chunk(scores: np.ndarray, offsets: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Ranks of one chunk; row r's positives are cols[offsets[r]:offsets[r+1]] (non-empty)."""
    num_rows, num_items = scores.shape
    rows = np.repeat(np.arange(num_rows), np.diff(np.append(offsets, len(cols))))
    positive_scores = scores[rows, cols]
    best = np.maximum.reduceat(positive_scores, offsets)
    best_col = np.minimum.reduceat(np.where(positive_scores == best[rows], cols, num_items), offsets)
    higher = np.count_nonzero(scores > best[:, None], axis=1)
    tie_rows, tie_cols = np.nonzero(scores == best[:, None])
    tied_before = np.bincount(tie_rows[tie_cols < best_col[tie_rows]], minlength=num_rows)
    return 1 + higher + tied_before


def _one_positive_each(owners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(len(owners) + 1), owners


def _captions_by_image(owners: np.ndarray, num_images: int) -> tuple[np.ndarray, np.ndarray]:
    counts = np.bincount(owners, minlength=num_images)
    missing = np.flatnonzero(counts == 0)
    if len(missing):
        raise ValueError(f"image {missing[0]} has no caption (every image needs at least one)")
    return np.concatenate([[0], np.cumsum(counts)]), np.argsort(owners, kind="stable")


def _normalised(features: np.ndarray) -> np.ndarray:
    """Unit rows; rows already unit-norm (to 1e-5) are used as given, so 500k x 512 inputs are not copied."""
    squared_norms = np.einsum("ij,ij->i", features, features)
    if np.allclose(squared_norms, 1.0, rtol=0, atol=1e-5):
        return features
    return features / np.sqrt(np.maximum(squared_norms, 1e-24))[:, None]


def _as_numpy(values, dtype) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor (kept import-free: metrics need only numpy)
        values = values.detach().cpu().float().numpy() if values.is_floating_point() else values.cpu().numpy()
    return np.ascontiguousarray(values, dtype=dtype)


def _check_classification_inputs(logits: np.ndarray, labels: np.ndarray) -> None:
    if logits.ndim != 2 or labels.ndim != 1 or len(logits) != len(labels):
        raise ValueError(f"need logits [N, C] and labels [N]; got {logits.shape} and {labels.shape}")
    if len(labels) == 0:
        raise ValueError("no samples to score")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}); got {labels.min()}..{labels.max()}")


def _check_retrieval_inputs(images, texts, owners, ks) -> None:
    if images.ndim != 2 or texts.ndim != 2 or images.shape[1] != texts.shape[1]:
        raise ValueError(f"need features [N, D] and [M, D]; got {images.shape} and {texts.shape}")
    if owners.shape != (len(texts),):
        raise ValueError(f"text_to_image needs one image index per caption ({len(texts)}), got {owners.shape}")
    if len(images) == 0 or len(texts) == 0:
        raise ValueError("retrieval needs at least one image and one caption")
    if owners.min() < 0 or owners.max() >= len(images):
        raise ValueError(f"text_to_image must lie in [0, {len(images)})")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}")
