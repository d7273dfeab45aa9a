"""`mmssl train` with image-text matching: exact resume and accumulation with the ITM term, the
head saved under `heads` (export and plain eval drop it), `eval retrieval --rerank itm` re-ranks
with it, and a checkpoint without one is refused in one line."""
import json

import numpy as np
import pytest
import torch

from helpers import assert_resumes_exactly, config
from mmssl.cli import main
from mmssl.train.loop import train
from mmssl.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def itm_config(world, output, *extra):
    return config(world, output, "loss.itm_weight=1", "train.batch_size=16", *extra)


@pytest.fixture(scope="module")
def itm_run(world, tmp_path_factory, one_thread):
    output = tmp_path_factory.mktemp("itm") / "run"
    straight = train(itm_config(world, output, "train.steps=6"))
    return output, straight


def test_itm_training_logs_the_term_and_resumes_exactly(world, itm_run, tmp_path):
    output, straight = itm_run
    assert len(straight.losses) == 6 and all(np.isfinite(straight.losses))
    record = read_metrics(output / "metrics.jsonl")[-1]
    assert record["loss"] == pytest.approx(record["contrastive_loss"] + record["itm_loss"], rel=1e-6)
    assert 0.1 < record["itm_loss"] < 2.0
    assert_resumes_exactly(lambda out, *extra: itm_config(world, out, *extra), output, straight, tmp_path / "b")


def test_itm_accumulates_to_the_same_losses(world, itm_run, tmp_path):
    _, straight = itm_run
    split = train(itm_config(world, tmp_path / "acc", "train.steps=6", "train.accum_steps=4"))
    assert split.losses[0] == pytest.approx(straight.losses[0], rel=1e-5)    # the same batch, the same weights
    # later steps: AdamW's first updates turn float-rounding differences of near-zero gradients into
    # lr-sized weight differences (the CPU's kernels sum micro-batches in another order), and a hard
    # negative drawn from slightly different logits can change; exactness is test_accumulate's, on gradients
    assert split.losses == pytest.approx(straight.losses, rel=2e-3)


def test_the_head_is_saved_apart_and_export_drops_it(itm_run, tmp_path):
    output, _ = itm_run
    state = torch.load(output / "checkpoints" / "latest.pt", weights_only=True)
    assert set(state["heads"]) == {"itm"}
    assert not any(key.startswith("heads") or "fusion" in key for key in state["model"])
    assert main(["export", "--checkpoint", str(output), "--out", str(tmp_path / "export")]) == 0
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "export" / "open_clip_model.safetensors"))
    assert len(exported) == len(state["model"]) and not any("fusion" in key or "itm" in key for key in exported)


def test_eval_retrieval_reranks_with_the_itm_head(world, itm_run, tmp_path, capsys):
    output, _ = itm_run
    val = str(world / "syn" / "val")
    assert main(["eval", "retrieval", "--checkpoint", str(output), "--data", val, "--workers", "0"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["eval", "retrieval", "--checkpoint", str(output), "--data", val, "--workers", "0",
                 "--rerank", "itm", "--rerank-k", "4"]) == 0
    reranked = json.loads(capsys.readouterr().out)
    assert reranked["rerank"]["scorer"] == "itm" and reranked["rerank"]["k"] == 4
    assert reranked["rerank"]["before"] == plain["metrics"]
    for name in ("image_retrieval_recall@5", "image_retrieval_recall@10", "text_retrieval_recall@10"):
        assert reranked["metrics"][name] == plain["metrics"][name]      # beyond k: cosine membership
    assert reranked["metrics"]["image_retrieval_recall@1"] <= plain["metrics"]["image_retrieval_recall@5"]


def test_rerank_without_an_itm_head_is_one_line_exit_2(world, tmp_path, capsys):
    output = tmp_path / "plain"
    train(config(world, output, "train.steps=1"))
    capsys.readouterr()
    code = main(["eval", "retrieval", "--checkpoint", str(output), "--data", str(world / "syn" / "val"),
                 "--workers", "0", "--rerank", "itm"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "has no itm head: train with loss.itm_weight > 0" in err and len(err.splitlines()) == 1


def test_caption_selection_scores_with_the_itm_head(world, itm_run, capsys):
    from eval.embed import load_model
    from mmssl.heads.itm_scoring import itm_pair_scores
    from mmssl.heads.saved import load_head
    from mmssl.data import build_eval_loader

    output, _ = itm_run
    binding = str(world / "syn" / "binding")
    assert main(["eval", "caption-selection", "--checkpoint", str(output), "--data", binding, "--workers", "0",
                 "--scorer", "itm", "--precision", "fp32"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["scorer"] == "itm" and result["metrics"]["num_images"] == 12 and result["metrics"]["chance"] == 0.25
    # the first image's four scores are the head's log-odds of its four captions
    loaded = load_model(str(output), "fp32")
    head = load_head(str(output), "itm", loaded.model)
    batch = next(iter(build_eval_loader(binding, transform=loaded.transform, batch_size=1, num_workers=0)))
    meta = batch.meta[0]
    tokens = loaded.tokenizer([meta["captions"][0], *meta["negatives"]])[None]
    with torch.inference_mode():
        direct = itm_pair_scores(loaded.model, head, batch.images, tokens)[0]
    from eval.caption_selection import run_caption_selection

    outcome = run_caption_selection(loaded, binding, "itm", checkpoint=str(output), workers=0)
    assert outcome["result"]["metrics"] == result["metrics"]
    torch.testing.assert_close(torch.tensor(outcome["scores"][0]), direct.float(), rtol=0, atol=1e-5)
