"""Re-ranking retrieval (`eval.rerank`): cosine top-k as the plain metrics order it, re-ranked
ranks against hand-worked cases, and identities a re-ranker must keep (re-scoring by the cosine
itself changes nothing; recall@K for K >= k never moves)."""
import numpy as np
import pytest

from eval.metrics import retrieval_metrics
from eval.rerank import reranked_ranks, rerank_retrieval, top_candidates


def unit(rows, dim, seed):
    values = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return values / np.linalg.norm(values, axis=1, keepdims=True)


def test_top_candidates_order_by_score_then_lower_index():
    queries = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    items = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=np.float32)
    assert top_candidates(queries, items, 3).tolist() == [[1, 2, 3], [0, 4, 3]]
    assert top_candidates(queries, items, 9).shape == (2, 5)          # k above the item count: all of them
    images, texts = unit(40, 8, 0), unit(70, 8, 1)
    brute = np.argsort(-(texts @ images.T), axis=1, kind="stable")[:, :5]
    assert np.array_equal(top_candidates(texts, images, 5, rows_per_chunk=7), brute)


def test_reranked_ranks_by_hand():
    candidates = np.array([[4, 7, 2], [1, 0, 3], [5, 6, 8]])
    scores = np.array([[0.1, 0.9, 0.5], [0.3, 0.3, 0.1], [1.0, 2.0, 3.0]], dtype=np.float32)
    truth = np.array([[2], [0], [9]])
    ranks = reranked_ranks(candidates, scores, lambda found: found == truth, np.array([3, 2, 40]))
    # row 0: order 7, 2, 4 -> image 2 second; row 1: tie keeps cosine order 1, 0 -> second; row 2: absent
    assert ranks.tolist() == [2, 2, 40]


def test_rescoring_by_the_cosine_reproduces_the_plain_metrics():
    images, texts = unit(30, 6, 2), unit(60, 6, 3)
    owners = np.repeat(np.arange(30), 2)
    plain = retrieval_metrics(images, texts, owners, ks=(1, 5, 10))
    score = lambda image_index, caption_index: np.einsum("ij,ij->i", images[image_index], texts[caption_index])
    for k in (1, 4, 16):
        assert rerank_retrieval(images, texts, owners, score, k=k, ks=(1, 5, 10), pairs_per_chunk=50) == plain


def test_an_oracle_reranker_lifts_recall_at_1_to_the_cosine_recall_at_k():
    images, texts = unit(50, 4, 4), unit(50, 4, 5)
    owners = np.arange(50)
    plain = retrieval_metrics(images, texts, owners, ks=(1, 8, 10))
    oracle = lambda image_index, caption_index: (owners[caption_index] == image_index).astype(np.float32)
    got = rerank_retrieval(images, texts, owners, oracle, k=8, ks=(1, 8, 10))
    assert got["image_retrieval_recall@1"] == pytest.approx(plain["image_retrieval_recall@8"])
    assert got["text_retrieval_recall@1"] == pytest.approx(plain["text_retrieval_recall@8"])
    assert plain["image_retrieval_recall@1"] < got["image_retrieval_recall@1"] < 1.0
    for name in ("image_retrieval_recall@8", "image_retrieval_recall@10", "text_retrieval_recall@10"):
        assert got[name] == plain[name]                                  # K >= k: membership unchanged
    # an adversary pushes every true pair to the bottom of its top k
    adversary = lambda image_index, caption_index: -oracle(image_index, caption_index)
    worst = rerank_retrieval(images, texts, owners, adversary, k=8, ks=(1, 7, 8))
    assert worst["image_retrieval_recall@1"] == 0.0 and worst["image_retrieval_recall@7"] == 0.0
    assert worst["image_retrieval_recall@8"] == plain["image_retrieval_recall@8"]
