"""The training loop's parts in isolation: weight-decay split, lr schedule, checkpoints, RNG, metrics."""
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from mmssl.config import TrainConfig
from mmssl.errors import UserError
from mmssl.train import checkpoint as ckpt
from mmssl.train.metrics import MetricsLog, read_metrics
from mmssl.train.optim import build_optimizer, build_scheduler, param_groups, warmup_cosine


class TwoTower(nn.Module):
    """A stand-in with the parameter kinds CLIP has: matrices, norms, biases, 1-D tokens, temperature."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self.ln = nn.LayerNorm(3)
        self.class_embedding = nn.Parameter(torch.zeros(3))
        self.positional_embedding = nn.Parameter(torch.zeros(5, 3))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.frozen = nn.Parameter(torch.zeros(2, 2), requires_grad=False)


def test_weight_decay_only_on_matrices():
    model = TwoTower()
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in decay["params"]) == ["positional_embedding", "proj.weight"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == [
        "class_embedding", "ln.bias", "ln.weight", "logit_scale", "proj.bias"]


def test_weight_decay_split_on_open_clip_model():
    from mmssl.models import create_model

    model = create_model("tiny-vit-64")
    decay, no_decay = param_groups(model, 0.1)
    decayed = {n for n, p in model.named_parameters() if any(p is q for q in decay["params"])}
    assert "logit_scale" not in decayed and "visual.class_embedding" not in decayed
    assert "ln_final.weight" not in decayed and "visual.transformer.resblocks.0.ln_1.bias" not in decayed
    assert {"visual.conv1.weight", "token_embedding.weight", "text_projection"} <= decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_warmup_cosine_values():
    factor = warmup_cosine(warmup=10, total=110)
    assert [factor(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.5)
    assert factor(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert factor(110) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(0, 10)(0) == 1.0


def test_scheduler_drives_optimizer_lr():
    cfg = TrainConfig(lr=0.01, warmup=2, steps=6)
    model = TwoTower()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.005, 0.01] + [0.01 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert seen == pytest.approx(expected)
    assert all(group["lr"] == optimizer.param_groups[0]["lr"] for group in optimizer.param_groups)


def test_save_is_atomic_and_latest_follows(tmp_path):
    first = ckpt.save_checkpoint(tmp_path, 5, {"model": {"w": torch.ones(2)}, "optimizer": {}, "scheduler": {}})
    second = ckpt.save_checkpoint(tmp_path, 10, {"model": {"w": torch.full((2,), 3.0)}, "optimizer": {},
                                                 "scheduler": {}})
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["latest.pt", "step_000005.pt", "step_000010.pt"]
    latest = folder / "latest.pt"
    assert latest.is_symlink() and str(latest.readlink()) == "step_000010.pt"
    loaded = torch.load(latest, weights_only=True)
    assert loaded["step"] == 10 and loaded["version"] == ckpt.CHECKPOINT_VERSION
    assert torch.equal(loaded["model"]["w"], torch.full((2,), 3.0))
    assert torch.load(first, weights_only=True)["step"] == 5
    assert ckpt.find_resume("latest", tmp_path)[0] == second.resolve()


def test_find_resume(tmp_path):
    assert ckpt.start_point(tmp_path, None) is None
    assert ckpt.find_resume("latest", tmp_path) is None  # nothing saved yet: a fresh start
    with pytest.raises(UserError, match="checkpoint not found"):
        ckpt.find_resume(str(tmp_path / "nope.pt"), tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        ckpt.load_checkpoint(tmp_path / "junk.pt")


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    path = ckpt.save_checkpoint(tmp_path, 1, {"rng": ckpt.rng_state()})
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(torch.load(path, weights_only=True)["rng"])
    again = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    assert again[:3] == expected[:3] and torch.equal(again[3], expected[3])


def test_metrics_log_drops_records_past_the_resume_step(tmp_path):
    log = MetricsLog(tmp_path, enabled=True)
    for step in (10, 20, 30):
        log.write({"step": step, "loss": 1.0 / step})
    MetricsLog(tmp_path, enabled=True, resume_step=20).write({"step": 30, "loss": 0.5})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [
        (10, 0.1), (20, 0.05), (30, 0.5)]
    MetricsLog(tmp_path / "other", enabled=False).write({"step": 1})
    assert not (tmp_path / "other").exists()


def test_tensorboard_requested_but_missing_is_one_message(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    log = MetricsLog(tmp_path, enabled=True, tensorboard=True)
    log.write({"step": 1, "loss": 2.0})
    log.close()
    assert capsys.readouterr().err.count("tensorboard is not installed") == 1
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 2.0}]
