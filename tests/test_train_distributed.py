"""`torchrun --nproc_per_node 2 -m mmssl train` on CPU (gloo): one writer, a global contrastive batch."""
import pytest
import torch

from helpers import needs_torchrun, torchrun_mmssl_train, write_micro_model
from mmssl.cli import main
from mmssl.config import load_config
from mmssl.train.metrics import read_metrics


def first_global_batch_loss(cfg) -> float:
    """Step 1's loss recomputed in one process: rank 0's and rank 1's first batches, scored together."""
    from mmssl.data.train_loader import build_train_loader
    from mmssl.models import create_model, image_transform
    from mmssl.objective import Objective
    from mmssl.train.loop import seed_everything

    seed_everything(cfg.train.seed)
    model = create_model(cfg.model)
    images, texts = [], []
    for rank in (0, 1):
        loader = build_train_loader(cfg.data, transform=image_transform(model), tokenizer=model.tokenizer,
                                    batch_size=cfg.train.batch_size, seed=cfg.train.seed, decode_size=32,
                                    rank=rank, world_size=2)
        batch = next(iter(loader))
        images.append(batch.images), texts.append(batch.texts)
    with torch.no_grad():
        return Objective(model, cfg)(torch.cat(images), torch.cat(texts), step=0)["loss"].item()


def torchrun_train(tmp_path, num_train: int, *extra) -> list:
    """`torchrun --nproc_per_node 2 -m mmssl train` on a fresh synthetic world and the micro model,
    one thread per process; returns the overrides it ran with."""
    assert main(["prep", "synthetic", "--out", str(tmp_path / "syn"), "--num-train", str(num_train), "--num-val",
                 "48", "--quiet"]) == 0
    write_micro_model(tmp_path)
    overrides = [f"model.name={tmp_path / 'micro.json'}", f"data.train={tmp_path / 'syn/train'}", "data.val=null",
                 "data.workers=0", "data.shuffle_buffer=32", f"train.output={tmp_path / 'run'}",
                 "train.log_every=1", "train.precision=fp32", *extra]
    done = torchrun_mmssl_train(overrides)
    assert done.returncode == 0, [line for line in done.stderr.splitlines() if "Error" in line or "mmssl" in line]
    return overrides


@needs_torchrun
def test_torchrun_two_cpu_processes(tmp_path):
    overrides = torchrun_train(tmp_path, 320, "train.batch_size=8", "train.steps=4", "train.warmup=2",
                               "train.save_every=2")
    records = read_metrics(tmp_path / "run/metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # rank 0 alone writes
    assert records[0]["samples_per_s"] > 0
    # the logged loss is InfoNCE over both ranks' 8 samples: the gathered 16-sample batch
    cfg = load_config("tiny", overrides)
    assert records[0]["loss"] == pytest.approx(first_global_batch_loss(cfg), abs=1e-5)

    folder = tmp_path / "run/checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["latest.pt", "step_000002.pt", "step_000004.pt"]
    saved = torch.load(folder / "latest.pt", weights_only=True)
    assert saved["world_size"] == 2 and len(saved["data"]) == len(saved["rng"]) == 2
    assert [d["step"] for d in saved["data"]] == [4, 4]  # each rank consumed 4 batches of its own slot


@needs_torchrun
def test_torchrun_pretext_tasks_with_learned_weights(tmp_path):
    """Image-only pretext terms under torchrun: every term is a per-image mean, so the ranks' mean is
    the global batch's loss; the learned log-variances stay identical on both ranks (one checkpoint)."""
    overrides = torchrun_train(tmp_path, 160, "train.batch_size=4", "train.steps=2", "train.warmup=1",
                               "train.save_every=0", "loss.kind=rotation", "loss.colorize_weight=1",
                               "loss.weighting=uncertainty", "heads.colorize.decoder_depth=0")
    records = read_metrics(tmp_path / "run/metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["loss"] == pytest.approx(first_global_batch_loss(load_config("tiny", overrides)), abs=1e-5)
    assert records[0]["logvar_rotation_loss"] == 0.0 and records[1]["logvar_colorize_loss"] != 0.0
    saved = torch.load(tmp_path / "run/checkpoints/latest.pt", weights_only=True)
    assert saved["heads"]["weighting"]["log_vars"][0].item() == pytest.approx(records[-1]["logvar_rotation_loss"],
                                                                              abs=0.05)
