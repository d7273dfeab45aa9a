"""eval.fewshot: the k-shot draw (seeded, nested, train only), the weight-decay protocol, the curve's
mean / std, and `mmssl eval linear-probe --fewshot-k` end to end (k=0 = `eval zeroshot`'s acc1)."""
import json

import numpy as np
import pytest

import eval.fewshot as fewshot
from eval.fewshot import (ONE_SHOT_WEIGHT_DECAY, check_shots, fewshot_curve, fewshot_indices, fewshot_probe,
                          shots_digest)
from eval.linear_probe import WEIGHT_DECAYS
from helpers import exit_code, write_micro_checkpoint
from mmssl.errors import UserError

COMMON = ["--workers", "0", "--batch-size", "32"]


def _clusters(seed, per_class, num_classes, dim, spread, centres_seed=0):
    centres = np.random.default_rng(centres_seed).normal(size=(num_classes, dim))
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    features = centres[labels] + spread * rng.normal(size=(len(labels), dim))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    return features.astype(np.float32), labels


# ---------------------------------------------------------------- the draw


def test_draw_is_seeded_exactly_k_per_class_and_nested():
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(5), [20, 30, 25, 16, 40]))
    first, again = fewshot_indices(labels, 4, seed=0), fewshot_indices(labels, 4, seed=0)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, fewshot_indices(labels, 4, seed=1))
    assert np.bincount(labels[first]).tolist() == [4, 4, 4, 4, 4]
    assert len(set(first.tolist())) == 20
    for small, large in ((1, 2), (2, 4), (4, 16)):  # the k=2 draw extends the k=1 draw, class by class
        inner, outer = fewshot_indices(labels, small, 3), fewshot_indices(labels, large, 3)
        for label in range(5):
            assert set(inner[labels[inner] == label]) < set(outer[labels[outer] == label])
    # same seed, same draw, whatever else is asked: one seed's k=1 shots are the first of its k=4 shots
    assert np.array_equal(fewshot_indices(labels, 1, 7), fewshot_indices(labels, 4, 7)[::4])


def test_a_class_with_fewer_than_k_images_is_refused():
    labels = np.repeat(np.arange(3), [10, 10, 3])
    check_shots(labels, 3)
    with pytest.raises(UserError, match="--fewshot-k 4: class 2 has 3 training images"):
        fewshot_indices(labels, 4, 0)
    features, _ = _clusters(0, 1, 23, 4, 0.1)
    with pytest.raises(UserError, match="class 2 has 3"):  # before any fit, whatever the order of ks
        fewshot_curve(features, labels, features, labels, [8, 1], [0])


def test_only_train_shots_are_fitted_and_no_test_key_is_drawn(monkeypatch):
    train_x, train_y = _clusters(1, 12, 4, 8, 0.5)
    test_x, test_y = _clusters(2, 6, 4, 8, 0.5)
    train_keys = [f"train/{i:03d}" for i in range(len(train_y))]
    test_keys = [f"test/{i:03d}" for i in range(len(test_y))]
    fitted = []
    real_fit = fewshot.fit_logistic_regression
    monkeypatch.setattr(fewshot, "fit_logistic_regression", lambda x, y, *a: fitted.append(x) or real_fit(x, y, *a))

    probe = fewshot_probe(train_x, train_y, test_x, test_y, k=3, seed=5)
    drawn = {train_keys[i] for i in probe.indices}
    assert len(drawn) == 12 and drawn <= set(train_keys) and not drawn & set(test_keys)
    shot_rows = {row.tobytes() for row in train_x[probe.indices].astype(np.float64)}
    test_rows = {row.tobytes() for row in test_x.astype(np.float64)}
    assert len(fitted) > 10  # the sweep's fold fits and the final one
    for x in fitted:
        rows = {row.tobytes() for row in x}
        assert rows <= shot_rows and not rows & test_rows
    assert len(fitted[-1]) == 12  # the final classifier is refit on all k*C shots
    assert shots_digest(train_keys, probe.indices) == shots_digest(train_keys, fewshot_indices(train_y, 3, 5))


# ---------------------------------------------------------------- the probe and the curve


def test_weight_decay_is_fixed_at_one_shot_and_cross_validated_on_the_shots_above():
    train_x, train_y = _clusters(3, 20, 6, 16, 0.8)
    test_x, test_y = _clusters(4, 10, 6, 16, 0.8)
    one = fewshot_probe(train_x, train_y, test_x, test_y, k=1, seed=0)
    assert (one.weight_decay, one.weight_decay_from, one.validation_acc1) == (ONE_SHOT_WEIGHT_DECAY, "fixed", {})
    assert len(one.indices) == 6
    # at that weight decay one shot per class ranks classes as its nearest shot (the prototype) does
    prototype = np.argmax(test_x @ train_x[one.indices].T, axis=1)
    assert one.metrics["lp_acc1"] == pytest.approx(np.mean(train_y[one.indices][prototype] == test_y))

    four = fewshot_probe(train_x, train_y, test_x, test_y, k=4, seed=0)
    assert four.weight_decay_from == "cross-validation" and four.weight_decay in WEIGHT_DECAYS
    assert {float(w) for w in WEIGHT_DECAYS[::16]} <= set(four.validation_acc1)  # the 7 coarse values
    assert 7 < len(four.validation_acc1) <= 15
    # CV top-1 is a share of the 24 held-out shot predictions; the choice is the best (largest on ties)
    assert all(round(acc * 24, 6) == round(acc * 24) for acc in four.validation_acc1.values())
    best = max(four.validation_acc1.values())
    assert four.validation_acc1[four.weight_decay] == best
    assert four.weight_decay == max(w for w, acc in four.validation_acc1.items() if acc == best)


def test_accuracy_rises_from_one_to_sixteen_shots_on_noisy_clusters():
    train_x, train_y = _clusters(5, 40, 10, 16, 1.2)
    test_x, test_y = _clusters(6, 30, 10, 16, 1.2)
    curve = fewshot_curve(train_x, train_y, test_x, test_y, [1, 4, 16], [0, 1, 2])
    acc = {k: curve[str(k)]["lp_acc1_mean"] for k in (1, 4, 16)}
    assert 0.1 < acc[1] < acc[4] < acc[16] <= 1.0
    assert acc[16] - acc[1] > 0.15
    for k in (1, 4, 16):
        per_seed = curve[str(k)]["per_seed"]
        assert list(per_seed) == ["0", "1", "2"]
        assert all(entry["num_shots"] == 10 * k for entry in per_seed.values())
        values = [entry["lp_acc1"] for entry in per_seed.values()]
        assert curve[str(k)]["lp_acc1_mean"] == pytest.approx(np.mean(values))
        assert curve[str(k)]["lp_acc1_std"] == pytest.approx(np.std(values))
    assert curve["1"]["lp_acc1_std"] > 0  # three different one-shot draws do not score alike


def test_std_is_zero_with_one_seed_and_the_curve_is_deterministic():
    train_x, train_y = _clusters(7, 10, 5, 8, 1.0)
    test_x, test_y = _clusters(8, 10, 5, 8, 1.0)
    curve = fewshot_curve(train_x, train_y, test_x, test_y, [1, 2], [11])
    for k in ("1", "2"):
        assert curve[k]["lp_acc1_std"] == 0.0 and curve[k]["lp_mean_per_class_recall_std"] == 0.0
        assert curve[k]["lp_acc1_mean"] == curve[k]["per_seed"]["11"]["lp_acc1"]
    assert curve["1"]["lp_acc5_mean"] == 1.0  # 5 classes: the true one is always in the top 5
    assert curve == fewshot_curve(train_x, train_y, test_x, test_y, [2, 1], [11])


# ---------------------------------------------------------------- the command


@pytest.mark.parametrize("argv, message", [
    (["--fewshot-k", "0"], "argument --fewshot-k: expected a number >= 1, got 0"),
    (["--fewshot-k", "1,two"], "argument --fewshot-k: expected a whole number, got 'two'"),
    (["--fewshot-k", "1,2048"], "argument --fewshot-k: each K at most 1024, got 2048"),
    (["--fewshot-k", ",".join(str(k) for k in range(1, 18))], "argument --fewshot-k: at most 16 values, got 17"),
    (["--fewshot-k", "1", "--seeds", "0"], "argument --seeds: expected a number >= 1, got 0"),
    (["--fewshot-k", "1", "--seeds", "101"], "argument --seeds: at most 100, got 101"),
    (["--seeds", "3"], "--seeds and --plot go with --fewshot-k"),
    (["--fewshot-k", "1", "--seed", "-1"], "--seed -1: few-shot draw seeds must be >= 0"),
])
def test_bad_arguments_are_one_line_exit_2(tmp_path, capsys, argv, message):
    code = exit_code(["eval", "linear-probe", "--checkpoint", "missing.pt", "--train", str(tmp_path),
                      "--test", str(tmp_path), *argv])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: " in err[0] and err[0].endswith(message)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """train/ (10 a class) and test/ (4 a class) trees of noisy solid-colour images, 3 classes."""
    from helpers import colour_class_folders

    return colour_class_folders(tmp_path_factory.mktemp("fewshot_folders"), noise=60, size=32, split_in_name=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved random-init micro model: every command loads the same weights (a random-init
    `openclip:` model would differ from one load to the next)."""
    return write_micro_checkpoint(tmp_path_factory.mktemp("fewshot_ckpt") / "micro.pt")


@pytest.fixture(scope="module")
def image_only_checkpoint(checkpoint):
    import torch

    state = torch.load(checkpoint, weights_only=True)
    state["config"]["loss"]["kind"] = "simclr"
    path = checkpoint.parent / "simclr.pt"
    torch.save(state, path)
    return path


def _probe_argv(checkpoint, folders, *extra):
    return ["eval", "linear-probe", "--checkpoint", str(checkpoint), "--train", str(folders / "train"),
            "--test", str(folders / "test"), *COMMON, *extra]


def test_fewshot_command_end_to_end(checkpoint, folders, tmp_path, capsys):
    out, plot = tmp_path / "fewshot.json", tmp_path / "fewshot.png"
    assert exit_code(_probe_argv(checkpoint, folders, "--fewshot-k", "8,1,2,4", "--seeds", "2", "--output", str(out),
                                 "--plot", str(plot))) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads(out.read_text())
    assert (result["task"], result["fewshot_k"], result["seeds"]) == ("linear_probe_fewshot", [1, 2, 4, 8], [0, 1])
    assert (result["num_train_samples"], result["num_samples"], result["num_classes"]) == (30, 12, 3)
    assert list(result["metrics"]) == ["0", "1", "2", "4", "8"] and "zeroshot_note" not in result
    for k in (1, 2, 4, 8):
        point = result["metrics"][str(k)]
        seeds = point["per_seed"]
        assert list(seeds) == ["0", "1"] and all(entry["num_shots"] == 3 * k for entry in seeds.values())
        assert point["lp_acc1_mean"] == pytest.approx(np.mean([entry["lp_acc1"] for entry in seeds.values()]))
        assert point["lp_acc1_std"] == pytest.approx(np.std([entry["lp_acc1"] for entry in seeds.values()]))
        assert point["lp_acc5_mean"] is None  # 3 classes: NaN, written as null
        assert seeds["0"]["shots_digest"] != seeds["1"]["shots_digest"]
        assert seeds["0"]["weight_decay_from"] == ("fixed" if k == 1 else "cross-validation")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # k=0 is `eval zeroshot` on the same test set, same class names and templates
    assert exit_code(["eval", "zeroshot", "--checkpoint", str(checkpoint), "--data", str(folders / "test"), *COMMON]) == 0
    zeroshot = json.loads(capsys.readouterr().out)
    assert result["metrics"]["0"]["acc1"] == zeroshot["metrics"]["acc1"]
    assert result["metrics"]["0"] == zeroshot["metrics"] and zeroshot["num_samples"] == 12

    # a seed draws the same shots whatever the other ks: seed 1 alone at k=1 repeats seed 1 above
    assert exit_code(_probe_argv(checkpoint, folders, "--fewshot-k", "1", "--seeds", "1", "--seed", "1")) == 0
    again = json.loads(capsys.readouterr().out)["metrics"]["1"]["per_seed"]["1"]
    assert again == result["metrics"]["1"]["per_seed"]["1"]  # same weights, same shots: the same fit

    # 10 training images a class cannot make a 16-shot point
    assert exit_code(_probe_argv(checkpoint, folders, "--fewshot-k", "1,16")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("mmssl: error: --fewshot-k 16: class 0 has 10 training images (3 of 3 classes have "
                       "fewer than 16); use a smaller k")


def test_image_only_checkpoint_omits_k0_with_a_note(image_only_checkpoint, folders, tmp_path, capsys):
    plot = tmp_path / "no_zeroshot.png"
    assert exit_code(_probe_argv(image_only_checkpoint, folders, "--fewshot-k", "1,2", "--seeds", "1",
                                 "--plot", str(plot))) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result["metrics"]) == ["1", "2"] and result["num_samples"] == 12
    assert result["zeroshot_note"].startswith("k=0 (zero-shot) omitted: zero-shot (k=0) needs a text tower")
    assert all(result["metrics"][k]["per_seed"]["0"]["num_shots"] == 3 * int(k) for k in ("1", "2"))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
