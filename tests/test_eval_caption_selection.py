"""`mmssl eval caption-selection`: true caption vs its hard negatives, per negative kind."""
import json
import sys
import zlib

import pytest
import torch
import webdataset as wds

from data_prep import synthetic
from eval.caption_selection import SCORERS, cosine_scores, run_caption_selection, selection_metrics
from eval.embed import LoadedModel, load_model
from helpers import exit_code, jpeg_bytes, to_tensor, write_micro_checkpoint, write_shards
from mmssl.data import build_eval_loader
from mmssl.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")
KINDS = ["colour_swap", "shape_swap", "position_swap"]
NUM_BINDING = 20


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("selection_world")
    synthetic.generate(out, num_train=1, num_val=8, num_heldout=1, num_binding=NUM_BINDING, shard_size=8, seed=2,
                       workers=1, quiet=True)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_micro_checkpoint(tmp_path_factory.mktemp("selection_ckpt") / "micro.pt")


def _fake_loaded():
    """No model: its tokenizer turns each caption into one number, which `_table_scores` returns."""
    return LoadedModel(model=torch.nn.Module(), tokenizer=_table_tokens, transform=to_tensor, name="fake",
                       pretrained="none", device=torch.device("cpu"), autocast_dtype=None)


def _table_score(caption: str) -> int:
    return zlib.crc32(caption.encode()) % 3   # 0, 1 or 2: ties between captions are common


def _table_tokens(captions):
    return torch.tensor([[_table_score(c), 7] for c in captions])


def _table_scores(loaded, images, tokens):
    assert images.ndim == 4 and tokens.ndim == 3 and images.shape[0] == tokens.shape[0]
    return tokens[..., 0].float()


def _binding_metas(world):
    loader = build_eval_loader(str(world / "binding"), transform=to_tensor, batch_size=64, num_workers=0)
    return [meta for batch in loader for meta in batch.meta]


def _candidates(meta):
    return [*meta["captions"][:1], *meta["negatives"]]


def test_metrics_from_known_scores_ties_are_wrong():
    scores = [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 2, 3], [1, 0.5, 0.5, 2]]
    metrics = selection_metrics(scores, [KINDS] * 4)
    assert metrics == {"acc": 0.25, "acc_colour_swap": 0.5, "acc_shape_swap": 0.75, "acc_position_swap": 0.5,
                       "chance": 0.25, "num_images": 4}
    # different numbers of negatives: chance is the mean of 1 / captions; a kind counts its own pairs
    metrics = selection_metrics([[2, 1], [2, 1, 3]], [["a"], ["a", "b"]])
    assert metrics == {"acc": 0.5, "acc_a": 1.0, "acc_b": 0.0, "chance": (1 / 2 + 1 / 3) / 2, "num_images": 2}


def test_eval_loader_keeps_each_samples_json(world):
    metas = _binding_metas(world)
    assert len(metas) == NUM_BINDING
    assert all(meta["negative_kinds"] == KINDS and len(_candidates(meta)) == 4 for meta in metas)
    loader = build_eval_loader(str(world / "val"), transform=to_tensor, batch_size=64, num_workers=0)
    val = [(meta, captions) for batch in loader for meta, captions in zip(batch.meta, batch.captions)]
    assert len(val) == 8
    assert all("captions" not in meta and "classname" in meta and len(captions) == 1 for meta, captions in val)


def test_hand_built_scorer_gives_exact_accuracies(world):
    outcome = run_caption_selection(_fake_loaded(), str(world / "binding"), "table", batch_size=6, workers=0,
                                    score_pairs=_table_scores)
    metas = _binding_metas(world)
    expected_kind = {kind: 0 for kind in KINDS}
    expected_all = 0
    for meta in metas:
        true, *negatives = [_table_score(c) for c in _candidates(meta)]
        expected_all += all(true > n for n in negatives)
        for kind, negative in zip(meta["negative_kinds"], negatives):
            expected_kind[kind] += true > negative
    result = outcome["result"]
    assert result["task"] == "image_caption_selection" and result["scorer"] == "table"
    assert result["model"] == "fake" and result["pretrained"] == "none" and result["language"] == "en"
    assert result["num_samples"] == NUM_BINDING and result["num_skipped"] == 0
    metrics = result["metrics"]
    assert metrics["num_images"] == NUM_BINDING and metrics["chance"] == 0.25
    assert metrics["acc"] == expected_all / NUM_BINDING
    for kind in KINDS:
        assert metrics[f"acc_{kind}"] == expected_kind[kind] / NUM_BINDING
    assert 0 < expected_all < NUM_BINDING  # the table makes some images right and some wrong
    assert [list(s) for s in outcome["scores"]] == [[_table_score(c) for c in _candidates(m)] for m in metas]


def test_cli_refuses_data_without_captions_lists(world, checkpoint, tmp_path, capsys):
    args = ["eval", "caption-selection", "--checkpoint", str(checkpoint), "--workers", "0"]
    assert exit_code(args + ["--data", str(world / "val")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(world / "val") in err and "'negatives' list" in err
    bad = tmp_path / "bad_kinds"
    bad.mkdir()
    with wds.TarWriter(str(bad / "00000.tar")) as sink:
        sink.write({"__key__": "k0", "jpg": jpeg_bytes(0),
                    "json": json.dumps({"captions": ["a red circle"], "negatives": ["a blue circle"],
                                        "negative_kinds": ["x", "y"]})})
    assert exit_code(args + ["--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sample k0" in err and "'negative_kinds' must be a list of 1" in err
    for name, meta, message in (
            ("numbers", {"captions": ["a red circle"], "negatives": [1, 2]}, "'negatives' list of strings"),
            ("too_many", {"captions": ["a red circle"], "negatives": ["x"] * 10_000}, "at most 64 are scored")):
        hostile = tmp_path / name
        hostile.mkdir()
        with wds.TarWriter(str(hostile / "00000.tar")) as sink:
            sink.write({"__key__": "k1", "jpg": jpeg_bytes(0), "json": json.dumps(meta)})
        assert exit_code(args + ["--data", str(hostile)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "sample k1" in err and message in err


def test_negatives_without_kinds_are_scored_by_position(tmp_path):
    data = tmp_path / "plain"
    data.mkdir()
    rows = {f"k{i}": (f"k{i} caption 0", [f"k{i} caption {c}" for c in range(1, 3 if i < 3 else 2)]) for i in range(5)}
    with wds.TarWriter(str(data / "00000.tar")) as sink:
        for key, (true, negatives) in rows.items():
            sink.write({"__key__": key, "jpg": jpeg_bytes(0), "txt": true,
                        "json": json.dumps({"negatives": negatives})})   # the true caption from .txt
    outcome = run_caption_selection(_fake_loaded(), str(data), "table", batch_size=4, workers=0,
                                    score_pairs=_table_scores)
    metrics = outcome["result"]["metrics"]
    assert set(metrics) == {"acc", "acc_negative_1", "acc_negative_2", "chance", "num_images"}
    assert metrics["num_images"] == 5 and metrics["chance"] == pytest.approx((3 / 3 + 2 / 2) / 5)
    assert outcome["kinds"] == [["negative_1", "negative_2"]] * 3 + [["negative_1"]] * 2
    expected = selection_metrics([[_table_score(c) for c in [rows[key][0], *rows[key][1]]] for key in outcome["keys"]],
                                 outcome["kinds"])
    assert metrics == expected


def test_itm_scorer_on_a_checkpoint_without_an_itm_head_is_a_user_error(world, checkpoint, capsys):
    assert set(SCORERS) == {"cosine", "itm", "caption"}
    args = ["eval", "caption-selection", "--checkpoint", str(checkpoint), "--data", str(world / "binding"),
            "--workers", "0", "--scorer", "itm"]
    assert exit_code(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no itm head" in err.lower()


def test_cosine_scorer_end_to_end(world, checkpoint, tmp_path, capsys):
    output = tmp_path / "selection.json"
    assert exit_code(["eval", "caption-selection", "--checkpoint", str(checkpoint), "--data", str(world / "binding"),
                      "--workers", "1", "--batch-size", "8", "--precision", "fp32", "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert result["task"] == "image_caption_selection" and result["scorer"] == "cosine"
    assert result["dataset"] == str(world / "binding") and result["pretrained"] == str(checkpoint)
    metrics = result["metrics"]
    assert set(metrics) == {"acc", "acc_colour_swap", "acc_shape_swap", "acc_position_swap", "chance", "num_images"}
    assert metrics["num_images"] == NUM_BINDING == result["num_samples"] and metrics["chance"] == 0.25
    assert all(0 <= metrics[key] <= 1 for key in ("acc", *(f"acc_{k}" for k in KINDS)))
    assert metrics["acc"] <= min(metrics[f"acc_{k}"] for k in KINDS)
    # the batched scores are the per-pair cosines of the encoders
    loaded = load_model(str(checkpoint), "fp32")
    outcome = run_caption_selection(loaded, str(world / "binding"), batch_size=8, workers=0)
    assert outcome["result"]["metrics"] == metrics
    metas = _binding_metas(world)
    loader = build_eval_loader(str(world / "binding"), transform=loaded.transform, batch_size=1, num_workers=0)
    first = next(iter(loader))
    with torch.inference_mode():
        image = torch.nn.functional.normalize(loaded.model.encode_image(first.images), dim=-1)
        texts = torch.nn.functional.normalize(loaded.model.encode_text(loaded.tokenizer(_candidates(metas[0]))), dim=-1)
        direct = (image @ texts.T)[0]
        batched = cosine_scores(loaded, first.images, loaded.tokenizer(_candidates(metas[0]))[None])[0]
    assert torch.allclose(direct, batched, atol=1e-5)
    assert torch.allclose(torch.tensor(outcome["scores"][0]), direct, atol=1e-5)
