"""`mmssl eval knn` (weighted k-NN on frozen features) against a brute-force numpy reference, and
what an image-only checkpoint (loss.kind=simclr) is valid for: k-NN, image index
and image search; zero-shot and retrieval refuse it in one line."""
import json
import tarfile

import numpy as np
import pytest
import torch

from helpers import exit_code, write_micro_checkpoint
from eval.knn import knn_scores


def brute_force_knn(train, labels, test, num_classes, k, temperature=0.07):
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    scores = np.zeros((len(test), num_classes))
    for row, query in enumerate(test):
        similarity = train @ query
        for neighbour in np.argsort(-similarity, kind="stable")[:k]:
            scores[row, labels[neighbour]] += np.exp(similarity[neighbour] / temperature)
    return scores


@pytest.mark.parametrize("k", [1, 5, 20, 500])
def test_knn_scores_equal_brute_force(k):
    rng = np.random.default_rng(k)
    train, test = rng.normal(size=(120, 16)) * 3, rng.normal(size=(37, 16))
    labels = rng.integers(0, 6, size=120)
    ours = knn_scores(train, labels, test, num_classes=7, k=k, chunk=10)
    expected = brute_force_knn(train, labels, test, 7, min(k, 120))
    np.testing.assert_allclose(ours, expected, rtol=1e-4)
    assert (ours[:, 6] == 0).all()                      # a class with no training sample gets no vote


@pytest.fixture(scope="module")
def image_only_checkpoint(tmp_path_factory):
    path = write_micro_checkpoint(tmp_path_factory.mktemp("ckpt") / "simclr.pt")
    state = torch.load(path, weights_only=True)
    state["config"]["loss"]["kind"] = "simclr"
    torch.save(state, path)
    return path


def test_knn_command_on_an_image_only_checkpoint(world, image_only_checkpoint, tmp_path):
    val = world / "syn" / "val"
    out = tmp_path / "knn.json"
    assert exit_code(["eval", "knn", "--checkpoint", str(image_only_checkpoint), "--train", str(val),
                      "--test", str(val), "--k", "1", "--output", str(out), "--workers", "0"]) == 0
    result = json.loads(out.read_text())
    assert result["task"] == "knn" and result["k"] == 1 and result["num_samples"] == 48
    assert result["metrics"]["knn_acc1"] == 1.0    # k=1: each test image is its own nearest neighbour
    assert set(result["metrics"]) == {"knn_acc1", "knn_acc5", "knn_mean_per_class_recall"}
    # the linear probe reads the same frozen features (eval.linear_probe.embed_train_test), never the text tower


@pytest.mark.parametrize("command", [["zeroshot", "--data"], ["retrieval", "--data"]])
def test_text_commands_refuse_an_image_only_checkpoint(world, image_only_checkpoint, command, capsys):
    argv = ["eval", command[0], "--checkpoint", str(image_only_checkpoint), command[1], str(world / "syn" / "val")]
    assert exit_code(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs a text tower; this checkpoint has none" in err


def test_image_index_and_image_search_with_an_image_only_checkpoint(world, image_only_checkpoint, tmp_path, capsys):
    val = world / "syn" / "val"
    assert exit_code(["index", "build", "--checkpoint", str(image_only_checkpoint), "--data", str(val),
                      "--out", str(tmp_path / "index")]) == 0
    with tarfile.open(sorted(val.glob("*.tar"))[0]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        (tmp_path / "query.jpg").write_bytes(tar.extractfile(member).read())
    capsys.readouterr()
    assert exit_code(["index", "search", "--index", str(tmp_path / "index"), "--image", str(tmp_path / "query.jpg"),
                      "-k", "3"]) == 0
    first_hit = capsys.readouterr().out.splitlines()[1].split()
    assert first_hit[0] == "1" and first_hit[2] == member.name[:-4] and float(first_hit[1]) == pytest.approx(1.0, abs=1e-3)
    assert exit_code(["index", "search", "--index", str(tmp_path / "index"), "--text", "a red circle"]) == 2
    assert "needs a text tower" in capsys.readouterr().err
