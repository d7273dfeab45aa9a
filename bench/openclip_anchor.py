"""Run open_clip's own trainer on a model config it does not ship (the benchmark's anchor).

usage: PYTHONPATH=bench/.anchor python bench/openclip_anchor.py MODEL_CONFIG.json [open_clip_train.main args]

open_clip_train only accepts registered model names, so the JSON is registered first (its file
stem becomes the name, e.g. tiny-vit-64).

For a time-to-accuracy run (bench/speedrun.py), set MMSSL_ANCHOR_SNAPSHOTS=DIR: after each of
open_clip's epochs the model's state_dict is written to DIR/epoch_N.pt and a line to
DIR/clock.jsonl with the training wall-clock so far (since `main` was called, the snapshot writes
left out), and with MMSSL_ANCHOR_BUDGET_S the process ends once that clock passes the budget.
open_clip's training code itself is untouched: its epoch function is wrapped from outside.
"""
import json
import os
import sys
import time
from pathlib import Path

import open_clip
import open_clip_train.main as trainer


def _clocked_epochs(snapshots: Path, budget_s: float) -> None:
    """Wrap open_clip_train.main.train_one_epoch: time it, snapshot the model after it."""
    began, excluded = time.perf_counter(), 0.0
    train_one_epoch = trainer.train_one_epoch
    snapshots.mkdir(parents=True, exist_ok=True)
    clock = (snapshots / "clock.jsonl").open("a")

    def timed(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=None):
        nonlocal excluded
        train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=tb_writer)
        wall = time.perf_counter() - began - excluded
        saving = time.perf_counter()
        import torch

        torch.save(model.state_dict(), snapshots / f"epoch_{epoch + 1}.pt")
        steps = (epoch + 1) * data["train"].dataloader.num_batches
        clock.write(json.dumps({"epoch": epoch + 1, "step": steps, "train_wall_s": round(wall, 3)}) + "\n")
        clock.flush()
        excluded += time.perf_counter() - saving
        if budget_s and wall >= budget_s:
            clock.close()
            os._exit(0)   # the budget is spent: stop here (open_clip has no time limit of its own)

    trainer.train_one_epoch = timed


if __name__ == "__main__":
    open_clip.add_model_config(sys.argv[1])
    if os.environ.get("MMSSL_ANCHOR_SNAPSHOTS"):
        _clocked_epochs(Path(os.environ["MMSSL_ANCHOR_SNAPSHOTS"]), float(os.environ.get("MMSSL_ANCHOR_BUDGET_S", 0)))
    trainer.main(sys.argv[2:])
