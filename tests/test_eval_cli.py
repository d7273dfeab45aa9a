"""`mmssl eval ...` end to end on tiny generated data with a random-init tiny model."""
import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import mmssl
from eval.embed import load_model
from eval.zeroshot import build_classifier, run_zeroshot
from mmssl.cli import main
from mmssl.config import ExperimentConfig, to_dict

MODEL = "openclip:tiny-vit-64"
COMMON = ["--workers", "0", "--batch-size", "32"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    assert main(["prep", "synthetic", "--out", str(out), "--num-train", "1", "--num-val", "48",
                 "--num-heldout", "12", "--workers", "1", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def one_template(tmp_path_factory):
    """A single prompt keeps the text side cheap where the test is about something else."""
    path = tmp_path_factory.mktemp("templates") / "one.txt"
    path.write_text("a photo of a {}.\n")
    return path


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory):
    """train/ and test/ ImageNet-style trees of noisy solid-colour images, plus one corrupt file in test/."""
    from helpers import colour_class_folders

    root = colour_class_folders(tmp_path_factory.mktemp("folders"), noise=25, size=64)
    (root / "test" / "red_thing" / "broken.jpg").write_bytes(b"not a jpeg at all")
    return root


def _run(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _manifest_count(folder):
    return json.loads((folder / "manifest.json").read_text())["num_samples"]


def test_zeroshot_on_synthetic_shards(synthetic, tmp_path, capsys):
    output, per_class, confusion = tmp_path / "zs.json", tmp_path / "per_class.csv", tmp_path / "cm.png"
    code, out, _ = _run(capsys, ["eval", "zeroshot", "--checkpoint", MODEL, "--data", str(synthetic / "val"),
                                 "--output", str(output), "--per-class", str(per_class),
                                 "--confusion", str(confusion), *COMMON])
    assert code == 0
    result = json.loads(out)
    assert result == json.loads(output.read_text())
    assert {"dataset", "model", "pretrained", "task", "metrics"} <= result.keys()
    assert (result["model"], result["pretrained"], result["task"]) == ("tiny-vit-64", "random-init",
                                                                      "zeroshot_classification")
    assert set(result["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in result["metrics"].values())
    assert result["num_samples"] == _manifest_count(synthetic / "val") == 48
    assert (result["num_skipped"], result["num_classes"]) == (0, 48)
    rows = per_class.read_text().splitlines()
    assert rows[0] == "class_id,classname,support,correct,recall" and len(rows) == 49
    assert sum(int(row.split(",")[2]) for row in rows[1:]) == 48
    assert confusion.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_retrieval_on_synthetic_shards(synthetic, capsys):
    code, out, _ = _run(capsys, ["eval", "retrieval", "--checkpoint", MODEL, "--data", str(synthetic / "heldout"),
                                 *COMMON])
    assert code == 0
    result = json.loads(out)
    assert result["task"] == "zeroshot_retrieval"
    assert result["num_samples"] == result["num_captions"] == _manifest_count(synthetic / "heldout") == 12
    metrics = result["metrics"]
    for direction in ("image", "text"):
        recalls = [metrics[f"{direction}_retrieval_recall@{k}"] for k in (1, 5, 10)]
        assert all(0.0 <= r <= 1.0 for r in recalls) and recalls == sorted(recalls)
        assert 1.0 <= metrics[f"{direction}_retrieval_median_rank"] <= 12
        assert 1.0 <= metrics[f"{direction}_retrieval_mean_rank"] <= 12


def test_corrupt_sample_is_skipped_and_counted(synthetic, one_template, tmp_path, capsys):
    source, broken = synthetic / "heldout", tmp_path / "broken"
    broken.mkdir()
    with tarfile.open(source / "00000.tar") as tar_in, tarfile.open(broken / "00000.tar", "w") as tar_out:
        for member in tar_in:
            data = tar_in.extractfile(member).read()
            if member.name == "000000003.jpg":
                data = data[:40]  # truncated JPEG
            member.size = len(data)
            tar_out.addfile(member, io.BytesIO(data))
    (broken / "manifest.json").write_text(json.dumps({"shards": [{"url": "00000.tar", "count": 12}]}))
    for name in ("classnames.txt", "templates.txt"):
        shutil.copy(source / name, broken / name)
    code, out, _ = _run(capsys, ["eval", "zeroshot", "--checkpoint", MODEL, "--data", str(broken),
                                 "--templates", str(one_template), *COMMON])
    assert code == 0
    result = json.loads(out)
    assert (result["num_samples"], result["num_skipped"]) == (11, 1)


def test_checkpoint_pipeline_matches_a_manual_computation(synthetic, one_template, tmp_path):
    torch.manual_seed(0)
    model = mmssl.create_model("tiny-vit-64")
    checkpoint = tmp_path / "step_000000.pt"
    torch.save({"model": model.state_dict(), "config": to_dict(ExperimentConfig()), "heads": {}, "step": 0}, checkpoint)
    loaded = load_model(str(checkpoint), precision="fp32")
    assert (loaded.name, loaded.pretrained) == ("tiny-vit-64", str(checkpoint))
    outcome = run_zeroshot(loaded, str(synthetic / "heldout"), templates_spec=str(one_template), batch_size=5, workers=0)

    classnames = (synthetic / "heldout" / "classnames.txt").read_text().split("\n")[:48]
    templates = ["a photo of a {}."]
    model.eval()
    with tarfile.open(synthetic / "heldout" / "00000.tar") as tar:
        jpg = tar.extractfile("000000000.jpg").read()
    with torch.no_grad():
        image = loaded.transform(Image.open(io.BytesIO(jpg)).convert("RGB"))[None]
        feature = torch.nn.functional.normalize(model.encode_image(image), dim=-1)
        expected = (feature @ build_classifier(model, model.tokenizer, classnames, templates)).numpy()[0]
    assert outcome["embedded"].keys[0] == "000000000"
    np.testing.assert_allclose(outcome["logits"][0], expected, atol=1e-5)


def test_class_folders_zeroshot_and_linear_probe(class_folders, capsys):
    code, out, _ = _run(capsys, ["eval", "zeroshot", "--checkpoint", MODEL, "--data", str(class_folders / "test"),
                                 "--templates", "simple", *COMMON])
    assert code == 0
    result = json.loads(out)
    assert (result["num_samples"], result["num_skipped"], result["num_classes"]) == (12, 1, 3)
    assert result["metrics"]["acc5"] is None  # NaN (fewer than 5 classes) is written as null

    code, out, _ = _run(capsys, ["eval", "linear-probe", "--checkpoint", MODEL, "--train",
                                 str(class_folders / "train"), "--test", str(class_folders / "test"), *COMMON])
    assert code == 0
    result = json.loads(out)
    assert result["task"] == "linear_probe"
    assert (result["num_train_samples"], result["num_samples"]) == (30, 12)
    assert result["metrics"]["lp_acc1"] == 1.0  # colours are linearly separable even in random features
    assert result["metrics"]["lp_acc5"] is None


@pytest.mark.parametrize("argv, message", [
    (["zeroshot", "--checkpoint", "missing.pt", "--data", "{data}"], "checkpoint not found"),
    (["zeroshot", "--checkpoint", MODEL, "--data", "{data}/nope"], "data not found"),
    (["zeroshot", "--checkpoint", MODEL, "--data", "{data}", "--classnames", "{empty}"], "classnames file is empty"),
    (["retrieval", "--checkpoint", "openclip:tiny-vit-64:/no/weights.bin", "--data", "{data}"], "weights file not found"),
])
def test_user_errors_are_one_line_exit_2(synthetic, tmp_path, capsys, argv, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    argv = [arg.format(data=synthetic / "heldout", empty=empty) for arg in argv]
    code, _, err = _run(capsys, ["eval", *argv, *COMMON])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmssl: error: ") and message in lines[0]
