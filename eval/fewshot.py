"""Few-shot linear probe: accuracy against k labelled training images per class (CLIP paper, Fig. 6).

Protocol (`mmssl eval linear-probe --fewshot-k 1,2,4,8,16 --seeds 3`):

- Train and test are embedded once (frozen, normalised image features). For each seed and k the
  shots are drawn from the *training* features alone: `numpy.random.default_rng(seed)` permutes
  each class's training indices (classes in label order) and the k-shot set is the first k of
  every class's permutation. The draw does not depend on k, so the sets are nested (k=2 extends
  k=1): the curve compares k values on common draws, and the same seed always draws the same
  images. A class with fewer than k training images is refused (UserError naming it), as
  CLIP_benchmark refuses it ("insufficient data for this eval"): a point labelled k must be k-shot.
- The classifier is eval.linear_probe's (multinomial logistic regression, L-BFGS, L2 weight decay
  over CLIP_benchmark's 97-value grid). Only the k*C shots are used to choose the weight decay --
  no extra labelled images, which would make it more than k-shot:
  k >= 2: cross-validation on the shots. F = min(k, 4) folds; fold f holds out the shots whose
  position in their class's draw is f mod F, so every fold validates on every class and trains on
  at least one image of each (k <= 4: leave one shot per class out). The score is top-1 over all
  held-out predictions; the sweep is the coarse-to-fine one of eval.linear_probe; ties -- frequent
  with k*C held-out predictions -- go to the larger weight decay (the smoother classifier).
  k = 1: nothing to validate on, so the weight decay is fixed at ONE_SHOT_WEIGHT_DECAY (1.0): that
  strong a penalty keeps the weights near the linear regime, where the probe ranks classes as the
  nearest class mean (prototype) classifier does, the usual one-shot baseline.
  The final classifier is refit on all k*C shots and scored on the full test set.
- Per k: lp_acc1 / lp_acc5 / lp_mean_per_class_recall mean and population std over the seeds (std
  0 with one seed), and per seed the metrics, the weight decay, how it was chosen, the number of
  shots and a digest of their keys. k=0 is zero-shot classification of the same test set
  (eval.zeroshot.run_zeroshot with the data's class names and templates), whose embedding pass is
  the test set's: an image-only checkpoint (no text tower) or data without class names omits k=0
  and says why in `zeroshot_note`.

CLIP_benchmark (clip_benchmark/metrics/linear_probe.py) draws its shots with torch.randperm over
the train set, sweeps the weight decay only when a separate full-size validation split is given
(and then refits on shots + that split) and otherwise uses weight decay 0; it trains with AdamW on
CUDA. Here the sweep stays inside the shots and the fit is the deterministic full-batch L-BFGS one.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from eval.linear_probe import COARSE_STEP, REFINE_SPANS, WEIGHT_DECAYS, _best_of, class_scores, fit_logistic_regression
from eval.metrics import classification_metrics

MAX_K = 1024                 # --fewshot-k: each value at most this
MAX_KS = 16                  # --fewshot-k: at most this many values
MAX_SEEDS = 100              # --seeds
DEFAULT_SEEDS = 3
MAX_FOLDS = 4                # weight-decay cross-validation folds (k >= 2)
ONE_SHOT_WEIGHT_DECAY = 1.0  # k = 1: no shot to spare for validation
METRICS = ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall")


@dataclass
class FewshotProbe:
    metrics: dict                 # lp_acc1, lp_acc5, lp_mean_per_class_recall on the test set
    weight_decay: float
    weight_decay_from: str        # "fixed" (k = 1) or "cross-validation"
    indices: np.ndarray           # the shots: indices into the training set
    validation_acc1: dict         # weight decay -> cross-validated top-1 of every value tried


def class_draws(labels: np.ndarray, seed: int) -> list:
    """Per class present in `labels` (ascending), a seeded permutation of its indices into `labels`."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    return [rng.permutation(np.flatnonzero(labels == label)) for label in np.unique(labels)]


def check_shots(labels: np.ndarray, k: int) -> None:
    """UserError when a class has fewer than k training images."""
    from mmssl.errors import UserError

    classes, counts = np.unique(np.asarray(labels), return_counts=True)
    short = np.flatnonzero(counts < k)
    if len(short):
        first = short[0]
        raise UserError(f"--fewshot-k {k}: class {int(classes[first])} has {int(counts[first])} training images "
                        f"({len(short)} of {len(classes)} classes have fewer than {k}); use a smaller k")


def fewshot_indices(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The k-shot set of `seed`: the first k of each class's draw, class by class (nested in k)."""
    check_shots(labels, k)
    return np.concatenate([draw[:k] for draw in class_draws(labels, seed)])


def fewshot_probe(train_features, train_labels, test_features, test_labels, k: int, seed: int,
                  max_iter: int = 1000) -> FewshotProbe:
    """Draw k shots per class from train, choose the weight decay on them, fit, score all of test."""
    x_train, y_train = np.asarray(train_features, np.float64), np.asarray(train_labels, np.int64)
    x_test, y_test = np.asarray(test_features, np.float64), np.asarray(test_labels, np.int64)
    if len(np.unique(y_train)) < 2:
        raise ValueError("the few-shot probe needs at least 2 classes in the training set")
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    indices = fewshot_indices(y_train, k, seed)
    x, y = x_train[indices], y_train[indices]
    if k == 1:
        weight_decay, tried, source = ONE_SHOT_WEIGHT_DECAY, {}, "fixed"
    else:
        position = np.tile(np.arange(k), len(indices) // k)   # each shot's place in its class's draw
        weight_decay, tried = cross_validated_weight_decay(x, y, position % min(k, MAX_FOLDS), max_iter)
        source = "cross-validation"
    model = fit_logistic_regression(x, y, weight_decay, max_iter)
    scores = class_scores(model, x_test, num_classes)
    metrics = {f"lp_{name}": value for name, value in classification_metrics(scores, y_test).items()}
    return FewshotProbe(metrics, weight_decay, source, indices, tried)


def cross_validated_weight_decay(x: np.ndarray, y: np.ndarray, folds: np.ndarray,
                                 max_iter: int = 1000) -> tuple[float, dict]:
    """(weight decay, {value: CV top-1}): the coarse-to-fine sweep scored by top-1 over the held-out
    shots of every fold; grid points are visited from the largest down, so ties keep the larger."""
    tried: dict[int, float] = {}
    last = len(WEIGHT_DECAYS) - 1

    def cv_acc1(grid_index: int) -> float:
        if grid_index not in tried:
            correct = 0
            for fold in np.unique(folds):
                held = folds == fold
                model = fit_logistic_regression(x[~held], y[~held], WEIGHT_DECAYS[grid_index], max_iter)
                correct += int(np.sum(model.predict(x[held]) == y[held]))
            tried[grid_index] = correct / len(y)
        return tried[grid_index]

    best = _best_of(range(last, -1, -COARSE_STEP), cv_acc1)
    for span in REFINE_SPANS:
        best = _best_of((min(best + span, last), best, max(best - span, 0)), cv_acc1)
    return float(WEIGHT_DECAYS[best]), {float(WEIGHT_DECAYS[i]): acc for i, acc in sorted(tried.items())}


def fewshot_curve(train_features, train_labels, test_features, test_labels, ks: Sequence[int],
                  seeds: Sequence[int], train_keys: Optional[Sequence[str]] = None) -> dict:
    """{str(k): summary} for every k: metric means / population stds over `seeds`, and `per_seed`."""
    for k in ks:
        check_shots(train_labels, k)
    curve = {}
    for k in ks:
        per_seed = {}
        for seed in seeds:
            probe = fewshot_probe(train_features, train_labels, test_features, test_labels, k, seed)
            per_seed[str(seed)] = {
                **probe.metrics,
                "weight_decay": probe.weight_decay,
                "weight_decay_from": probe.weight_decay_from,
                "num_shots": len(probe.indices),
                **({"shots_digest": shots_digest(train_keys, probe.indices)} if train_keys is not None else {}),
            }
        summary = {}
        for name in METRICS:
            values = np.array([entry[name] for entry in per_seed.values()], dtype=np.float64)
            summary[f"{name}_mean"], summary[f"{name}_std"] = float(np.mean(values)), float(np.std(values))
        curve[str(k)] = {**summary, "per_seed": per_seed}
    return curve


def shots_digest(keys: Sequence[str], indices: np.ndarray) -> str:
    """First 16 hex digits of the SHA-256 of the shots' keys (sorted, one a line): the same draw
    gives the same digest on any rerun over the same training set."""
    text = "\n".join(sorted(str(keys[i]) for i in indices))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def run_fewshot(loaded, train: str, test: str, ks: Sequence[int], seeds: Sequence[int], batch_size: int = 256,
                workers: int = 2, allow_remote: bool = False) -> dict:
    """Embed train, check every class has max(ks) images, zero-shot the test set (its embedding pass
    is the test set's; without a text tower or class names: test embedded alone and k=0 omitted),
    then the curve. Returns {"result": CLIP_benchmark-shaped dict, "train": Embedded, "test": Embedded}."""
    from eval.linear_probe import embed_labelled
    from eval.zeroshot import run_zeroshot
    from mmssl.data.benchmark_layout import default_split
    from mmssl.errors import UserError
    from mmssl.models.factory import require_text_tower

    ks, seeds = sorted(set(ks)), list(seeds)
    needed_by = "the few-shot linear probe"
    train_set = embed_labelled(loaded, train, "train", batch_size, workers, allow_remote, needed_by)
    check_shots(train_set.labels, max(ks))
    zeroshot, note = None, None
    try:
        require_text_tower(loaded.model, "zero-shot (k=0)")
        outcome = run_zeroshot(loaded, test, batch_size=batch_size, workers=workers, allow_remote=allow_remote,
                               split=default_split(test, "test"))
        zeroshot, test_set = outcome["result"]["metrics"], outcome["embedded"]
    except UserError as error:
        note = f"k=0 (zero-shot) omitted: {error}"
        test_set = embed_labelled(loaded, test, "test", batch_size, workers, allow_remote, needed_by)

    metrics = {"0": zeroshot} if zeroshot is not None else {}
    metrics.update(fewshot_curve(train_set.features, train_set.labels, test_set.features, test_set.labels,
                                 ks, seeds, train_keys=train_set.keys))
    result = {
        "dataset": test,
        "model": loaded.name,
        "pretrained": loaded.pretrained,
        "task": "linear_probe_fewshot",
        "metrics": metrics,
        "language": "en",
        "train_dataset": train,
        "fewshot_k": ks,
        "seeds": seeds,
        **({"zeroshot_note": note} if note else {}),
        "num_classes": int(len(np.unique(train_set.labels))),
        "num_train_samples": len(train_set.keys),
        "num_samples": len(test_set.keys),
        "num_skipped": train_set.skipped + test_set.skipped,
    }
    return {"result": result, "train": train_set, "test": test_set}
