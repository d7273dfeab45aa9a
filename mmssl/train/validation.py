"""Periodic zero-shot validation during training, borrowed from the `eval` package when present.

This is the one place `mmssl` reaches into `eval` (docs/design.md): the import happens inside the
call, so a training-only install (no `eval` package) trains fine and just says once that
validation is skipped.
"""
from __future__ import annotations

import sys

import torch

from mmssl.train.policy import autocast_dtype


class ZeroShotValidation:
    """`__call__(model) -> {"acc1", "acc5", "mean_per_class_recall"}` on a labelled shard set."""

    def __init__(self, data: str, device: torch.device, precision: str = "fp32", allow_remote: bool = False):
        """`precision`: the run's resolved precision (`mmssl.train.policy`); validation runs in it too."""
        self.data, self.allow_remote = data, allow_remote
        self.device = device
        self.autocast_dtype = autocast_dtype(precision)
        self.warned = False

    def __call__(self, model: torch.nn.Module) -> dict:
        try:
            from eval.embed import LoadedModel
            from eval.zeroshot import run_zeroshot
        except ModuleNotFoundError as err:
            if not (err.name or "").startswith("eval"):
                raise
            if not self.warned:
                sys.stderr.write("mmssl: periodic validation skipped: the eval package is not installed\n")
                self.warned = True
            return {}
        from mmssl.models import image_transform

        loaded = LoadedModel(
            model=model, tokenizer=model.tokenizer, transform=image_transform(model, train=False),
            name=getattr(model, "model_name", type(model).__name__), pretrained="training",
            device=self.device, autocast_dtype=self.autocast_dtype,
        )
        return dict(run_zeroshot(loaded, self.data, workers=0, allow_remote=self.allow_remote)["result"]["metrics"])
