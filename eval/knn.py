"""k-NN classification on frozen image features: the SSL literature's weighted vote.

Protocol of InstDisc (Wu et al. 2018) as DINO (Caron et al. 2021) runs it: features are
L2-normalised, each test image's k = 20 nearest training images by cosine similarity are found
(exact FAISS inner-product search), and each neighbour votes for its label with weight
exp(similarity / T), T = 0.07. A class's score is the sum of its votes; classes no neighbour has
score 0. Metrics (`eval.metrics.classification_metrics`) are reported prefixed `knn_`.
"""
from __future__ import annotations

import numpy as np

from eval.metrics import classification_metrics

K = 20
TEMPERATURE = 0.07


def knn_scores(train_features, train_labels, test_features, num_classes: int, k: int = K,
               temperature: float = TEMPERATURE, chunk: int = 4096) -> np.ndarray:
    """[N_test, num_classes] weighted votes of each test row's k nearest training rows."""
    import faiss

    def unit(features):
        features = np.ascontiguousarray(features, dtype=np.float32)
        return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)

    train, test = unit(train_features), unit(test_features)
    labels = np.asarray(train_labels, dtype=np.int64)
    k = min(k, len(train))
    index = faiss.IndexFlatIP(train.shape[1])
    index.add(train)
    scores = np.zeros((len(test), num_classes), dtype=np.float64)
    for start in range(0, len(test), chunk):
        similarity, neighbours = index.search(test[start:start + chunk], k)
        weights = np.exp(similarity.astype(np.float64) / temperature)
        rows = np.repeat(np.arange(start, start + len(neighbours)), k)
        np.add.at(scores, (rows, labels[neighbours].ravel()), weights.ravel())
    return scores


def run_knn(loaded, train: str, test: str, k: int = K, batch_size: int = 256, workers: int = 2,
            allow_remote: bool = False) -> dict:
    """Embed a labelled train and test set with a loaded model and classify test by k-NN;
    the result in the shape of the other `mmssl eval` commands."""
    from eval.linear_probe import embed_train_test

    sets = embed_train_test(loaded, train, test, batch_size, workers, allow_remote, "k-NN")
    train_set, test_set = sets["train"], sets["test"]
    num_classes = int(max(train_set.labels.max(), test_set.labels.max())) + 1
    scores = knn_scores(train_set.features, train_set.labels, test_set.features, num_classes, k)
    return {
        "dataset": test,
        "model": loaded.name,
        "pretrained": loaded.pretrained,
        "task": "knn",
        "metrics": {f"knn_{name}": value for name, value in classification_metrics(scores, test_set.labels).items()},
        "language": "en",
        "train_dataset": train,
        "k": min(k, len(train_set.keys)),
        "temperature": TEMPERATURE,
        "num_train_samples": len(train_set.keys),
        "num_samples": len(test_set.keys),
        "num_skipped": train_set.skipped + test_set.skipped,
    }
