"""eval.linear_probe: the L-BFGS logistic regression against sklearn, the sweep, determinism."""
import math

import numpy as np
import pytest
from eval.linear_probe import WEIGHT_DECAYS, class_scores, fit_logistic_regression, linear_probe, validation_split


def _clusters(seed, per_class, num_classes, dim, spread):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim))
    labels = np.repeat(np.arange(num_classes), per_class)
    features = centres[labels] + spread * rng.normal(size=(len(labels), dim))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    return features.astype(np.float32), labels


def test_fit_minimises_mean_cross_entropy_plus_half_weight_decay_norm():
    features, labels = _clusters(0, 40, 4, 8, spread=1.5)
    weight_decay = 0.01
    model = fit_logistic_regression(features.astype(np.float64), labels, weight_decay)
    weights, bias = model.coef_, model.intercept_
    logits = features @ weights.T + bias
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    residual = probs - np.eye(4)[labels]
    # stationary point of mean CE + wd/2 ||W||^2: both gradients vanish
    np.testing.assert_allclose(residual.T @ features / len(labels) + weight_decay * weights, 0, atol=1e-5)
    np.testing.assert_allclose(residual.mean(0), 0, atol=1e-5)


def test_classes_missing_from_training_score_minus_infinity():
    features, labels = _clusters(3, 10, 3, 4, spread=0.2)
    model = fit_logistic_regression(features, labels * 2, 0.01)  # labels 0, 2, 4 only
    scores = class_scores(model, features, num_classes=5)
    assert np.isneginf(scores[:, [1, 3]]).all() and np.isfinite(scores[:, [0, 2, 4]]).all()


def test_probe_separates_clusters_and_is_deterministic():
    train_x, train_y = _clusters(1, 30, 6, 16, spread=0.3)
    test_x, test_y = _clusters(1, 10, 6, 16, spread=0.3)  # same centres (same seed), other noise draws
    test_x, test_y = test_x[::-1].copy(), test_y[::-1].copy()
    first = linear_probe(train_x, train_y, test_x, test_y)
    second = linear_probe(train_x, train_y, test_x, test_y)
    assert first == second
    assert first.metrics["lp_acc1"] == 1.0 and first.metrics["lp_acc5"] == 1.0
    assert first.metrics["lp_mean_per_class_recall"] == 1.0
    assert first.weight_decay in WEIGHT_DECAYS
    coarse = {float(w) for w in WEIGHT_DECAYS[::16]}
    assert coarse <= set(first.validation_acc1)  # all 7 coarse values were tried, then refinements
    assert 7 < len(first.validation_acc1) <= 15


def test_fewer_than_five_classes_gives_nan_top5():
    train_x, train_y = _clusters(2, 20, 3, 8, spread=0.5)
    result = linear_probe(train_x, train_y, train_x, train_y)
    assert math.isnan(result.metrics["lp_acc5"])
    assert 0.9 <= result.metrics["lp_acc1"] <= 1.0


def test_validation_split():
    fit, val = validation_split(10, 0.2, seed=0)
    assert len(val) == 2 and len(fit) == 8
    assert sorted(np.concatenate([fit, val]).tolist()) == list(range(10))
    assert np.array_equal(val, validation_split(10, 0.2, seed=0)[1])
    with pytest.raises(ValueError):
        validation_split(1, 0.2, seed=0)
