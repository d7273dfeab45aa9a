"""`mmssl train` with SimCLR: image-only (`loss.kind=simclr`) on caption-free shards from `prep
folder`, exact resume with the two views; SLIP (`loss.simclr_weight`) logs its term."""
import numpy as np
import pytest
import torch

from helpers import CPU, config, logged_losses
from mmssl.train.loop import build_trainer, train
from mmssl.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def simclr_config(world, plain_images, output, *extra):
    return config(world, output, f"data.train={plain_images}", "loss.kind=simclr", "train.batch_size=8",
                  "data.workers=1", "data.shuffle_buffer=16", *extra)


def test_image_only_training_resumes_exactly_and_saves_the_head(world, plain_images, tmp_path):
    straight = train(simclr_config(world, plain_images, tmp_path / "a", "train.steps=6"))
    assert len(straight.losses) == 6 and all(np.isfinite(straight.losses))
    assert set(read_metrics(tmp_path / "a" / "metrics.jsonl")[0]) >= {"simclr_loss", "loss"}
    (tmp_path / "b").mkdir()
    first = build_trainer(simclr_config(world, plain_images, tmp_path / "b", "train.steps=6", "train.save_every=3"), CPU)
    first.cfg.steps = 3
    first.fit()
    resumed = train(simclr_config(world, plain_images, tmp_path / "b", "train.steps=6", "train.resume=latest"))
    assert resumed.losses == straight.losses[3:]
    assert logged_losses(tmp_path / "b") == logged_losses(tmp_path / "a")
    state = torch.load(tmp_path / "a/checkpoints/latest.pt", weights_only=True)
    assert set(state["heads"]) == {"simclr"} and state["config"]["loss"]["kind"] == "simclr"
    initial = build_trainer(simclr_config(world, plain_images, tmp_path / "c", "train.steps=1"), CPU).objective.model
    text_key, image_key = "token_embedding.weight", "visual.conv1.weight"
    assert torch.equal(state["model"][text_key], initial.state_dict()[text_key])        # text tower untrained
    assert not torch.equal(state["model"][image_key], initial.state_dict()[image_key])


def test_slip_trains_with_the_simclr_term_and_accumulates(world, tmp_path):
    one = train(config(world, tmp_path / "a", "train.steps=2", "loss.simclr_weight=1"))
    two = train(config(world, tmp_path / "b", "train.steps=2", "loss.simclr_weight=1", "train.accum_steps=4"))
    record = read_metrics(tmp_path / "a" / "metrics.jsonl")[-1]
    assert record["loss"] == pytest.approx(record["contrastive_loss"] + record["simclr_loss"], rel=1e-6)
    assert two.losses == pytest.approx(one.losses, rel=1e-4)
