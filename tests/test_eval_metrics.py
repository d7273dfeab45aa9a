"""eval.metrics: hand-computed cases (ties, several captions, < 5 classes) and brute-force references."""
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from eval.metrics import classification_metrics, per_class_counts, retrieval_metrics


def test_classification_hand_computed_with_ties_and_three_classes():
    logits = [
        [0.1, 0.9, 0.0],  # label 1, clear top-1
        [0.5, 0.5, 0.2],  # label 1 tied with class 0: the lower index ranks first -> miss
        [0.3, 0.3, 0.3],  # label 0, all tied: class 0 has the lowest index -> hit
        [0.2, 0.1, 0.7],  # label 1, ranked third -> miss
    ]
    labels = [1, 1, 0, 1]
    metrics = classification_metrics(logits, labels)
    assert metrics["acc1"] == 0.5
    assert math.isnan(metrics["acc5"])  # fewer than 5 classes
    # predictions 1, 0, 0, 2: class 0 recall 1/1, class 1 recall 1/3; class 2 never occurs
    assert metrics["mean_per_class_recall"] == pytest.approx((1 + 1 / 3) / 2)


def test_top5_counts_ties_before_the_label_by_index():
    logits = np.array([
        [1, 1, 1, 1, 1, 1],  # label 5: five tied classes with lower index come first -> rank 6
        [1, 1, 1, 1, 1, 1],  # label 4: rank 5 -> top-5 hit
        [0, 2, 2, 2, 2, 1],  # label 5: four higher scores -> rank 5, top-5 hit, top-1 miss
        [3, 3, 3, 3, 3, 3],  # label 0: rank 1
        [0, 0, 0, 0, 0, 9],  # label 0: one score above, ties only at higher indices -> rank 2
    ], dtype=np.float32)
    labels = np.array([5, 4, 5, 0, 0])
    metrics = classification_metrics(logits, labels)
    assert metrics["acc1"] == pytest.approx(1 / 5)
    assert metrics["acc5"] == pytest.approx(4 / 5)
    # argmax predictions: 0, 0, 1, 0, 5 -> class 0 recall 1/2, class 4 0/1, class 5 0/2
    assert metrics["mean_per_class_recall"] == pytest.approx((0.5 + 0 + 0) / 3)


def test_mean_per_class_recall_equals_sklearn_balanced_accuracy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 12)).astype(np.float32)
    labels = rng.integers(0, 10, size=500)  # classes 10, 11 never occur but can be predicted
    logits[np.arange(250), labels[:250]] += 2.0
    metrics = classification_metrics(logits, labels)
    with pytest.warns(UserWarning):  # sklearn warns that predictions contain classes absent from labels
        expected = balanced_accuracy_score(labels, logits.argmax(1))
    assert metrics["mean_per_class_recall"] == pytest.approx(expected, abs=1e-12)
    assert metrics["acc1"] == pytest.approx(np.mean(logits.argmax(1) == labels))
    top5 = np.argsort(-logits, axis=1, kind="stable")[:, :5]
    assert metrics["acc5"] == pytest.approx(np.mean((top5 == labels[:, None]).any(1)))


def test_per_class_counts():
    correct, support = per_class_counts([0, 1, 1, 2], [0, 1, 2, 2], num_classes=4)
    assert correct.tolist() == [1, 1, 1, 0]
    assert support.tolist() == [1, 1, 2, 0]


def test_classification_rejects_bad_inputs():
    with pytest.raises(ValueError, match="labels must lie"):
        classification_metrics([[0.1, 0.2]], [2])
    with pytest.raises(ValueError, match="no samples"):
        classification_metrics(np.zeros((0, 3)), [])


def test_retrieval_hand_computed_with_duplicates_and_several_captions():
    images = [[1, 0], [0, 1], [1, 0]]  # images 0 and 2 are identical: every text ties them
    texts = [[1, 0], [0, 1], [1, 0], [1, 0], [0.6, 0.8]]
    text_to_image = [0, 1, 2, 1, 2]
    metrics = retrieval_metrics(images, texts, text_to_image, ks=(1, 2, 3))
    # text -> image ranks: t0 1; t1 1; t2 2 (tied with image 0, lower index); t3 3; t4 3 (.8 above, tie before)
    assert metrics["image_retrieval_recall@1"] == pytest.approx(2 / 5)
    assert metrics["image_retrieval_recall@2"] == pytest.approx(3 / 5)
    assert metrics["image_retrieval_recall@3"] == 1.0
    assert metrics["image_retrieval_mean_rank"] == pytest.approx(2.0)
    assert metrics["image_retrieval_median_rank"] == 2.0
    # image -> text, best caption: i0 t0 rank 1; i1 t1 rank 1 (t3 scores 0); i2 t2 rank 2 (t0 ties first)
    assert metrics["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert metrics["text_retrieval_recall@2"] == 1.0
    assert metrics["text_retrieval_mean_rank"] == pytest.approx(4 / 3)
    assert metrics["text_retrieval_median_rank"] == 1.0


def test_retrieval_rejects_image_without_caption():
    with pytest.raises(ValueError, match="image 1 has no caption"):
        retrieval_metrics([[1, 0], [0, 1]], [[1, 0]], [0])


def _stable_positions(scores: np.ndarray) -> np.ndarray:
    """Brute force: each item's 1-based place in its row's stable descending sort."""
    order = np.argsort(-scores, axis=1, kind="stable")  # stable: lower index first among ties
    positions = np.empty_like(order)
    np.put_along_axis(positions, order, np.arange(1, scores.shape[1] + 1)[None, :], axis=1)
    return positions


def _reference_metrics(images, texts, text_to_image, ks):
    images = torch.nn.functional.normalize(torch.as_tensor(images), dim=-1).numpy()
    texts = torch.nn.functional.normalize(torch.as_tensor(texts), dim=-1).numpy()
    scores = texts @ images.T  # the full matrix, fine at test size
    text_ranks = _stable_positions(scores)[np.arange(len(texts)), text_to_image]
    positions = _stable_positions(np.ascontiguousarray(scores.T))
    image_ranks = np.array([positions[i, text_to_image == i].min() for i in range(len(images))])
    expected = {}
    for k in ks:
        expected[f"image_retrieval_recall@{k}"] = np.mean(text_ranks <= k)
        expected[f"text_retrieval_recall@{k}"] = np.mean(image_ranks <= k)
    expected.update(image_retrieval_mean_rank=text_ranks.mean(), image_retrieval_median_rank=np.median(text_ranks),
                    text_retrieval_mean_rank=image_ranks.mean(), text_retrieval_median_rank=np.median(image_ranks))
    return expected


def _lattice_vector(rng, dim):
    """A unit vector with four +-0.5 entries: dot products of such vectors are multiples of 1/4,
    exact in any summation order, so scores tie massively and every tie is exact."""
    vector = np.zeros(dim, np.float32)
    vector[rng.choice(dim, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    return vector


def _nudged(rng, vector):
    """Move one non-zero entry to a zero position: cosine 3/4 with the original."""
    moved = vector.copy()
    source, target = rng.choice(np.flatnonzero(moved)), rng.choice(np.flatnonzero(moved == 0))
    moved[target], moved[source] = moved[source], 0
    return moved


def test_retrieval_matches_brute_force_on_tied_lattice_vectors_at_moderate_size():
    rng = np.random.default_rng(1)
    dim, num_images = 32, 1500
    images = np.stack([_lattice_vector(rng, dim) for _ in range(num_images)])
    images[1000:1100] = images[0:100]  # duplicate images: exact ties across items
    text_to_image = np.concatenate([np.arange(num_images), rng.integers(num_images, size=4500)])
    texts = images[text_to_image].copy()  # duplicate captions too (exact ties for image -> text)
    for row, draw in enumerate(rng.random(len(texts))):
        if draw < 0.3:
            texts[row] = _lattice_vector(rng, dim)
        elif draw < 0.7:
            texts[row] = _nudged(rng, texts[row])
    expected = _reference_metrics(images, texts, text_to_image, ks=(1, 5, 10))
    small_chunks = retrieval_metrics(images, texts, text_to_image, chunk_bytes=1_000_000)  # 25 / 37 chunks, the last one short
    one_chunk = retrieval_metrics(images, texts, text_to_image, chunk_bytes=2**30)
    assert small_chunks == one_chunk
    assert small_chunks.keys() == expected.keys()
    for key, value in expected.items():
        assert small_chunks[key] == pytest.approx(value, abs=1e-12), key
    assert 0 < small_chunks["image_retrieval_recall@1"] < small_chunks["image_retrieval_recall@10"] < 1


def test_retrieval_matches_brute_force_on_clustered_float_vectors():
    rng = np.random.default_rng(2)
    dim, num_images = 48, 600
    centres = rng.normal(size=(50, dim)).astype(np.float32)
    images = centres[rng.integers(50, size=num_images)] + 0.5 * rng.normal(size=(num_images, dim)).astype(np.float32)
    text_to_image = np.repeat(np.arange(num_images), 5)
    texts = images[text_to_image] + 0.8 * rng.normal(size=(len(text_to_image), dim)).astype(np.float32)
    expected = _reference_metrics(images, texts, text_to_image, ks=(1, 5, 10))
    metrics = retrieval_metrics(images, texts, text_to_image, chunk_bytes=1 << 20)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
