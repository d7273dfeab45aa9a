"""`mmssl train` with captioning: exact resume and accumulation with the caption term, the head saved
under `heads`; `mmssl caption` on files and shards (a checkpoint without a head, a missing file and
a decompression bomb: one line, exit 2); `mmssl eval captioning` end to end on the world's val split."""
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import assert_resumes_exactly, config
from mmssl.cli import main
from mmssl.train.loop import train
from mmssl.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def caption_config(world, output, *extra):
    return config(world, output, "loss.caption_weight=1", "train.batch_size=16", *extra)


@pytest.fixture(scope="module")
def caption_run(world, tmp_path_factory, one_thread):
    output = tmp_path_factory.mktemp("caption") / "run"
    straight = train(caption_config(world, output, "train.steps=6"))
    return output, straight


def test_caption_training_logs_the_term_and_resumes_exactly(world, caption_run, tmp_path):
    output, straight = caption_run
    assert len(straight.losses) == 6 and all(np.isfinite(straight.losses))
    records = read_metrics(output / "metrics.jsonl")
    assert records[-1]["loss"] == pytest.approx(records[-1]["contrastive_loss"] + records[-1]["caption_loss"], rel=1e-6)
    assert records[-1]["caption_loss"] < records[0]["caption_loss"] <= math.log(49408) + 1   # it learns
    assert_resumes_exactly(lambda out, *extra: caption_config(world, out, *extra), output, straight, tmp_path / "b")


def test_caption_accumulates_to_the_same_losses(world, caption_run, tmp_path):
    _, straight = caption_run
    split = train(caption_config(world, tmp_path / "acc", "train.steps=6", "train.accum_steps=4"))
    assert split.losses == pytest.approx(straight.losses, rel=1e-4)


def test_the_head_is_saved_apart(caption_run):
    output, _ = caption_run
    state = torch.load(output / "checkpoints" / "latest.pt", weights_only=True)
    assert set(state["heads"]) == {"caption"} and "bias" in state["heads"]["caption"]
    assert not any("fusion" in key for key in state["model"])


def _png(path, size=(40, 32), seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "PNG")
    return path


def test_caption_command_on_files_and_shards(world, caption_run, tmp_path, capsys):
    output, _ = caption_run
    images = [str(_png(tmp_path / f"{i}.png", seed=i)) for i in range(3)]
    args = ["caption", "--checkpoint", str(output), "--image", *images, "--max-tokens", "5"]
    assert main(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["image"] for line in lines] == images and all(isinstance(line["caption"], str) for line in lines)
    assert main(args + ["--batch-size", "2"]) == 0          # batching changes nothing
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == lines
    val = str(world / "syn" / "val")
    target = tmp_path / "captions.jsonl"
    assert main(["caption", "--checkpoint", str(output), "--data", val, "--workers", "0", "--beams", "2",
                 "--max-tokens", "4", "--batch-size", "20", "--output", str(target)]) == 0
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(rows) == 48 and len({row["key"] for row in rows}) == 48
    assert all(len(row["caption"].split()) <= 4 for row in rows)


def test_caption_command_refusals_are_one_line_exit_2(world, caption_run, tmp_path, capsys):
    output, _ = caption_run
    plain = tmp_path / "plain"
    train(config(world, plain, "train.steps=1"))
    image = str(_png(tmp_path / "ok.png"))
    bomb = tmp_path / "bomb.png"
    buffer = io.BytesIO()
    Image.new("1", (9500, 9500)).save(buffer, "PNG")       # a few KiB that decode to 90 Mpx
    bomb.write_bytes(buffer.getvalue())
    capsys.readouterr()
    cases = [(["--checkpoint", str(plain), "--image", image],
              "has no caption head: train with loss.caption_weight > 0"),
             (["--checkpoint", str(output), "--image", str(tmp_path / "missing.png")], "image not found"),
             (["--checkpoint", str(output), "--image", str(bomb)], "9500x9500"),
             (["--checkpoint", str(output), "--image", image, "--beams", "0"], "expected a number >= 1")]
    for args, message in cases:
        try:
            code = main(["caption", *args])
        except SystemExit as exit:      # argparse's own one-line usage error
            code = exit.code
        assert code == 2
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert message in err and len(err.splitlines()) == 1 and captured.out == "", (args, err)


def test_eval_captioning_end_to_end(world, caption_run, tmp_path, capsys):
    output, _ = caption_run
    val = str(world / "syn" / "val")
    target = tmp_path / "captioning.json"
    assert main(["eval", "captioning", "--checkpoint", str(output), "--data", val, "--workers", "0",
                 "--max-tokens", "6", "--precision", "fp32", "--output", str(target)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads(target.read_text())
    assert result["task"] == "captioning" and result["language"] == "en" and result["dataset"] == val
    assert result["beams"] == 1 and result["max_tokens"] == 6
    metrics = result["metrics"]
    assert metrics["num_images"] == 48
    assert 0.0 <= metrics["bleu4"] <= 1.0 and math.isfinite(metrics["cider"]) and metrics["cider"] >= 0.0
    # the scores are the metric function's on the captions `mmssl caption` writes
    from eval.captioning import caption_metrics, run_captioning
    from eval.embed import load_model

    outcome = run_captioning(load_model(str(output), "fp32"), val, str(output), max_tokens=6, workers=0)
    assert outcome["result"]["metrics"] == metrics
    assert all(outcome["references"][key] for key in outcome["captions"])
    assert caption_metrics(outcome["captions"], outcome["references"])["bleu4"] == metrics["bleu4"]
    assert main(["caption", "--checkpoint", str(output), "--data", val, "--workers", "0", "--max-tokens", "6"]) == 0
    written = {row["key"]: row["caption"] for row in map(json.loads, capsys.readouterr().out.splitlines())}
    assert written == outcome["captions"]


def test_caption_selection_scores_by_caption_likelihood(world, caption_run, capsys):
    output, _ = caption_run
    binding = str(world / "syn" / "binding")
    assert main(["eval", "caption-selection", "--checkpoint", str(output), "--data", binding, "--workers", "0",
                 "--scorer", "caption", "--precision", "fp32"]) == 0
    result = json.loads(capsys.readouterr().out)
    metrics = result["metrics"]
    assert result["scorer"] == "caption" and metrics["num_images"] == 12 and metrics["chance"] == 0.25
    assert 0 <= metrics["acc"] <= min(metrics[f"acc_{kind}"] for kind in ("colour_swap", "shape_swap", "position_swap"))
