"""Linear probe: a logistic-regression classifier on frozen, normalised image features.

Protocol as in CLIP_benchmark (after the CLIP paper, appendix A.3): hold out a validation split
of the training set, sweep the weight decay over 97 log-spaced values in [1e-6, 1e2] with a
coarse-to-fine search (7 coarse points, then +-8, 4, 2, 1 steps around the best), retrain on
train + validation with the best value, report test metrics prefixed `lp_`. Unlike CLIP_benchmark
(AdamW minibatches on GPU) the classifier is scikit-learn's multinomial logistic regression,
fit full-batch with L-BFGS on CPU as the CLIP paper did: the problem is convex, so the result is
deterministic and needs no learning-rate schedule. The weight decay is the L2 coefficient of
mean cross-entropy + wd / 2 * ||W||^2 (bias free), i.e. scikit-learn's C = 1 / (wd * N).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eval.metrics import classification_metrics

WEIGHT_DECAYS = np.logspace(-6, 2, num=97)
COARSE_STEP = 16                  # every 16th grid value: 1e-6, 1e-5, ..., 1e2
REFINE_SPANS = (8, 4, 2, 1)


@dataclass
class ProbeResult:
    metrics: dict                 # lp_acc1, lp_acc5, lp_mean_per_class_recall
    weight_decay: float
    validation_acc1: dict         # weight decay -> validation top-1 of every value tried


def fit_logistic_regression(features: np.ndarray, labels: np.ndarray, weight_decay: float,
                            max_iter: int = 1000):
    """Multinomial logistic regression minimising mean CE + weight_decay / 2 * ||W||^2 (L-BFGS)."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=1.0 / (weight_decay * len(labels)), max_iter=max_iter, tol=1e-6)
    return model.fit(features, labels)


def class_scores(model, features: np.ndarray, num_classes: int) -> np.ndarray:
    """[N, num_classes] log-probabilities; classes absent from the training labels score -inf."""
    scores = np.full((len(features), num_classes), -np.inf)
    scores[:, model.classes_] = model.predict_log_proba(features)
    return scores


def linear_probe(train_features, train_labels, test_features, test_labels,
                 val_proportion: float = 0.2, seed: int = 0, max_iter: int = 1000) -> ProbeResult:
    """Sweep the weight decay on a validation split of train, refit on all of train, score test."""
    x_train, y_train = np.asarray(train_features, np.float64), np.asarray(train_labels, np.int64)
    x_test, y_test = np.asarray(test_features, np.float64), np.asarray(test_labels, np.int64)
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    if len(np.unique(y_train)) < 2:
        raise ValueError("the linear probe needs at least 2 classes in the training set")
    fit_idx, val_idx = validation_split(len(y_train), val_proportion, seed)

    tried: dict[int, float] = {}

    def validation_acc1(grid_index: int) -> float:
        if grid_index not in tried:
            model = fit_logistic_regression(x_train[fit_idx], y_train[fit_idx], WEIGHT_DECAYS[grid_index], max_iter)
            tried[grid_index] = float(np.mean(model.predict(x_train[val_idx]) == y_train[val_idx]))
        return tried[grid_index]

    best = _best_of(range(0, len(WEIGHT_DECAYS), COARSE_STEP), validation_acc1)
    for span in REFINE_SPANS:
        best = _best_of((max(best - span, 0), best, min(best + span, len(WEIGHT_DECAYS) - 1)), validation_acc1)

    weight_decay = float(WEIGHT_DECAYS[best])
    model = fit_logistic_regression(x_train, y_train, weight_decay, max_iter)
    scores = class_scores(model, x_test, num_classes)
    metrics = {f"lp_{name}": value for name, value in classification_metrics(scores, y_test).items()}
    return ProbeResult(metrics, weight_decay, {float(WEIGHT_DECAYS[i]): acc for i, acc in sorted(tried.items())})


def validation_split(count: int, val_proportion: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, validation indices): a seeded permutation, at least one sample on each side."""
    if count < 2:
        raise ValueError("the linear probe needs at least 2 training samples")
    num_val = min(max(int(round(count * val_proportion)), 1), count - 1)
    order = np.random.default_rng(seed).permutation(count)
    return order[num_val:], order[:num_val]


def _best_of(grid_indices, score) -> int:
    """The first index with the highest score (a later one must be strictly better)."""
    best_index, best_score = None, -1.0
    for index in grid_indices:
        value = score(index)
        if value > best_score:
            best_index, best_score = index, value
    return best_index


def embed_train_test(loaded, train: str, test: str, batch_size: int, workers: int, allow_remote: bool,
                     needed_by: str) -> dict:
    """{"train": Embedded, "test": Embedded}: frozen, normalised image features of two labelled
    sets (a CLIP_benchmark folder is read at its train / test split); unlabelled data is refused."""
    return {split: embed_labelled(loaded, data, split, batch_size, workers, allow_remote, needed_by)
            for split, data in (("train", train), ("test", test))}


def embed_labelled(loaded, data: str, split: str, batch_size: int, workers: int, allow_remote: bool,
                   needed_by: str):
    """Embedded features of one labelled set, a CLIP_benchmark folder read at `split`."""
    from eval.embed import embed_images, evaluation_mode, open_eval_data
    from mmssl.data.benchmark_layout import default_split
    from mmssl.errors import UserError

    batches = open_eval_data(data, loaded.transform, batch_size, workers, allow_remote, default_split(data, split))
    with evaluation_mode(loaded.model):
        embedded = embed_images(loaded, batches, split)
    if embedded.labels is None:
        raise UserError(f"{data}: samples carry no 'label' in their json; {needed_by} needs labels")
    return embedded


def run_linear_probe(loaded, train: str, test: str, batch_size: int = 256, workers: int = 2,
                     seed: int = 0, allow_remote: bool = False) -> dict:
    """Embed a labelled train and test set with a loaded model and probe; CLIP_benchmark-shaped result.

    A CLIP_benchmark folder given as `train` is read at its `train` split, as `test` at its `test`
    split (the same folder may be both); name a split folder itself to read another split."""
    sets = embed_train_test(loaded, train, test, batch_size, workers, allow_remote, "the linear probe")
    probe = linear_probe(sets["train"].features, sets["train"].labels, sets["test"].features,
                         sets["test"].labels, seed=seed)
    return {
        "dataset": test,
        "model": loaded.name,
        "pretrained": loaded.pretrained,
        "task": "linear_probe",
        "metrics": probe.metrics,
        "language": "en",
        "train_dataset": train,
        "weight_decay": probe.weight_decay,
        "num_train_samples": len(sets["train"].keys),
        "num_samples": len(sets["test"].keys),
        "num_skipped": sets["train"].skipped + sets["test"].skipped,
    }
