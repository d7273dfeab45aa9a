"""The training loop end to end on generated synthetic shards with a micro model (CPU, seconds).

Exact resume, exact-batch accumulation, divergence handling, corrupt samples, metrics, and the
one-line errors of `mmssl train`.
"""
import io
import json
import math
import tarfile

import pytest
import torch

from helpers import CPU, config, logged_losses
from mmssl.cli import main
from mmssl.config import to_dict
from mmssl.objective import Objective
from mmssl.train.loop import Trainer, TrainingDiverged, build_trainer, train
from mmssl.train.metrics import read_metrics

# `world` (the synthetic shards and micro model these tests train on) is a fixture in conftest.py


def test_resume_reproduces_the_uninterrupted_run(world, tmp_path):
    straight = train(config(world, tmp_path / "a", "train.steps=40"))
    assert straight.step == 40 and len(straight.losses) == 40

    half = train(config(world, tmp_path / "b", "train.steps=40", "train.save_every=20"))
    assert half.losses == straight.losses  # same config, same numbers: the run is deterministic
    # the interrupted run: stop after 20 steps, then resume from latest for the remaining 20
    (tmp_path / "c").mkdir()
    first = build_trainer(config(world, tmp_path / "c", "train.steps=40", "train.save_every=20"), CPU)
    first.cfg.steps = 20
    first.fit()
    resumed = train(config(world, tmp_path / "c", "train.steps=40", "train.resume=latest"))
    assert resumed.losses == straight.losses[20:]
    assert logged_losses(tmp_path / "c") == logged_losses(tmp_path / "a")
    a = torch.load(tmp_path / "a/checkpoints/latest.pt", weights_only=True)
    c = torch.load(tmp_path / "c/checkpoints/latest.pt", weights_only=True)
    assert a["step"] == c["step"] == 40 and a["data"] == c["data"]
    assert all(torch.equal(a["model"][k], c["model"][k]) for k in a["model"])


def test_resume_is_exact_when_the_objective_draws_random_masks(world, tmp_path):
    """MLM draws its token masks from the global RNG each step; the loader must not draw from it
    when a resumed run starts iterating (it once took its base seed from there: one draw off)."""
    extra = ("train.steps=6", "loss.mlm_weight=1")
    straight = train(config(world, tmp_path / "a", *extra))
    (tmp_path / "b").mkdir()
    first = build_trainer(config(world, tmp_path / "b", *extra, "train.save_every=3"), CPU)
    first.cfg.steps = 3
    first.fit()
    resumed = train(config(world, tmp_path / "b", *extra, "train.resume=latest"))
    assert resumed.losses == straight.losses[3:]


def test_accumulation_keeps_the_contrastive_batch_exact(world, tmp_path):
    # AdamW: Muon's bf16 orthogonalisation would magnify the fp32 rounding differences of the split
    whole = train(config(world, tmp_path / "one", "train.steps=4", "train.optimizer=adamw"))
    split = train(config(world, tmp_path / "four", "train.steps=4", "train.accum_steps=4", "train.optimizer=adamw"))
    assert split.losses == pytest.approx(whole.losses, abs=1e-5)


def test_accumulation_logs_each_head_term(world, tmp_path):
    train(config(world, tmp_path, "train.steps=2", "train.log_every=1", "train.accum_steps=2", "loss.mlm_weight=0.5"))
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert len(records) == 2
    for record in records:
        assert record["mlm_loss"] > 0
        assert record["loss"] == pytest.approx(record["contrastive_loss"] + 0.5 * record["mlm_loss"], rel=1e-5)


def test_metrics_record_every_term(world, tmp_path):
    cfg = config(world, tmp_path, "train.steps=6", "train.log_every=3", "train.lr=0.002", "train.warmup=2",
                 "train.save_every=3")
    result = train(cfg)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [3, 6]
    for record in records:
        assert {"contrastive_loss", "loss", "lr", "logit_scale", "samples_per_s", "data_wait_s",
                "data_wait_frac", "corrupt_samples"} <= set(record)
        assert record["samples_per_s"] > 0 and 0 <= record["data_wait_frac"] <= 1
        assert record["corrupt_samples"] == 0
    # window mean of the per-step losses; lr after step 3 = 0.002 * cos-decay factor at step 3
    assert records[0]["loss"] == pytest.approx(sum(result.losses[:3]) / 3)
    assert records[0]["lr"] == pytest.approx(0.002 * 0.5 * (1 + math.cos(math.pi * 1 / 4)))
    assert 1 <= records[-1]["logit_scale"] <= 100
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest.pt", "step_000003.pt", "step_000006.pt"]
    saved = torch.load(tmp_path / "checkpoints/latest.pt", weights_only=True)
    assert {"model", "heads", "config", "step", "optimizer", "scheduler", "scaler", "rng", "data",
            "version"} <= set(saved)
    assert saved["config"]["train"]["lr"] == 0.002 and saved["heads"] == {}
    from mmssl.models import create_model

    model = create_model(str(tmp_path / "checkpoints/latest.pt"))
    assert not model.training and torch.equal(model.logit_scale.detach(), saved["model"]["logit_scale"])


class NanAtStep(Objective):
    """The real objective, except that step `bad` (1-based) returns a NaN loss."""

    bad = 5

    def forward(self, images, texts, step=None):
        terms = super().forward(images, texts, step)
        if step + 1 == self.bad:
            terms["loss"] = terms["loss"] * float("nan")
        return terms


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(world, tmp_path):
    cfg = config(world, tmp_path, "train.steps=10", "train.save_every=2")
    trainer = build_trainer(cfg, CPU)
    nan_objective = NanAtStep(trainer.objective.model, cfg)
    trainer = Trainer(cfg.train, CPU, nan_objective, trainer.loader, config_record=to_dict(cfg))
    with pytest.raises(TrainingDiverged, match=r"at step 5: loss is nan .*step_000004\.pt"):
        trainer.fit()
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["latest.pt", "step_000002.pt", "step_000004.pt"]
    last = torch.load(folder / "latest.pt", weights_only=True)
    assert last["step"] == 4 and all(torch.isfinite(v).all() for v in last["model"].values())


def test_huge_lr_exits_with_one_line_naming_the_step(world, tmp_path, capfd):
    args = [f"{k}={v}" for k, v in {
        "model.name": world / "micro.json", "data.train": world / "syn/train", "data.val": "null",
        "data.workers": 0, "train.output": tmp_path, "train.batch_size": 16, "train.steps": 8,
        "train.warmup": 0, "train.lr": 1e30, "train.grad_clip": "null", "train.precision": "fp32",
        "train.save_every": 1}.items()]
    assert main(["train", "--config", "tiny", *args]) == 1
    err = capfd.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("mmssl: error: training diverged at step ") and "last good checkpoint" in err
    step = int(err.split("at step ")[1].split(":")[0])
    latest = torch.load(tmp_path / "checkpoints/latest.pt", weights_only=True)
    assert latest["step"] == step - 1


def corrupt_copy(source, dest, bad_keys):
    """A copy of a shard folder whose samples `bad_keys` have undecodable JPEG bytes."""
    import shutil

    shutil.copytree(source, dest)
    for shard in dest.glob("*.tar"):
        with tarfile.open(shard) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(shard, "w") as tar:
            for member, data in members:
                key, ext = member.name.rsplit(".", 1)
                if ext == "jpg" and key in bad_keys:
                    data = b"\xff\xd8 definitely not a jpeg"
                    member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    return dest


def test_corrupt_samples_are_skipped_and_counted(world, tmp_path):
    with tarfile.open(world / "syn/train/00000.tar") as tar:
        keys = sorted({m.name.rsplit(".", 1)[0] for m in tar.getmembers()})[:3]
    data = corrupt_copy(world / "syn/train", tmp_path / "bad", set(keys))
    # no shuffling: the three bad samples are the first three read
    train(config(world, tmp_path / "run", f"data.train={data}", "data.shuffle_buffer=1", "train.steps=2"))
    assert [r["corrupt_samples"] for r in read_metrics(tmp_path / "run/metrics.jsonl")] == [3, 3]


@pytest.mark.parametrize("override, message", [
    ("data.train=/nonexistent/shards", "/nonexistent/shards"),
    ("train.precision=fp8", "train.precision"),
    ("train.steps=-5", "bad value for train.steps: -5"),
    ("train.accum_steps=0", "train.accum_steps"),
    ("train.stepz=5", "unknown config key: train.stepz"),
    ("train.resume=/nonexistent/ckpt.pt", "checkpoint not found"),
])
def test_bad_input_is_one_line_and_exit_2(world, tmp_path, capfd, override, message):
    base = [f"model.name={world / 'micro.json'}", f"data.train={world / 'syn/train'}", "data.val=null",
            f"train.output={tmp_path}", "data.workers=0"]
    assert main(["train", "--config", "tiny", *base, override]) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mmssl: error: ") and message in err


def test_empty_shard_list_is_one_line_and_exit_2(world, tmp_path, capfd):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text(json.dumps({"shards": [], "num_samples": 0}))
    assert main(["train", "--config", "tiny", f"data.train={empty}", f"train.output={tmp_path / 'o'}"]) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mmssl: error: ")


def test_periodic_zero_shot_validation_matches_eval(world, tmp_path):
    from eval.embed import load_model
    from eval.zeroshot import run_zeroshot

    train(config(world, tmp_path, f"data.val={world / 'syn/val'}", "train.steps=4", "train.val_every=2",
                 "train.log_every=2"))
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [sorted(k for k in r if k.startswith("val/")) for r in records] == [
        ["val/acc1", "val/acc5", "val/mean_per_class_recall"]] * 2
    final = run_zeroshot(load_model(str(tmp_path / "checkpoints/latest.pt"), "fp32"), str(world / "syn/val"),
                         workers=0)["result"]["metrics"]
    assert records[-1]["val/acc1"] == pytest.approx(final["acc1"])
    assert records[-1]["val/acc5"] == pytest.approx(final["acc5"])


def test_records_count_wall_time_without_validation(world, tmp_path, monkeypatch):
    """train_wall_s (the clock a time-to-accuracy figure reads) grows with training, not with the
    periodic validation, whose own seconds are each val record's val_s."""
    import time

    from mmssl.train import validation

    def slow_validation(self, model):
        time.sleep(0.6)
        return {"acc1": 0.5}

    monkeypatch.setattr(validation.ZeroShotValidation, "__call__", slow_validation)
    began = time.perf_counter()
    train(config(world, tmp_path, f"data.val={world / 'syn/val'}", "train.steps=6", "train.val_every=2",
                 "train.log_every=1"))
    took = time.perf_counter() - began
    records = read_metrics(tmp_path / "metrics.jsonl")
    walls = [r["train_wall_s"] for r in records]
    assert walls == sorted(walls) and 0 < walls[0] and walls[-1] < took - 3 * 0.6
    assert [r["step"] for r in records if "val_s" in r] == [2, 4, 6]
    assert all(0.6 <= r["val_s"] < 1.5 for r in records if "val_s" in r)
    # two validations lie between steps 2 and 5; none of their 1.2 s shows in the training clock
    assert walls[4] - walls[1] < took - sum(r["val_s"] for r in records if "val_s" in r)


def test_validation_without_eval_package_is_a_message(monkeypatch, capsys):
    import sys

    from mmssl.train.validation import ZeroShotValidation

    monkeypatch.setitem(sys.modules, "eval.embed", None)
    validate = ZeroShotValidation("unused", torch.device("cpu"))
    assert validate(torch.nn.Linear(1, 1)) == {} and validate(torch.nn.Linear(1, 1)) == {}
    assert capsys.readouterr().err.count("periodic validation skipped") == 1
