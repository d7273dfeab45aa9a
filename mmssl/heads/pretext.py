"""The pretext-task protocol shared by the classic image-only heads (rotation, jigsaw, colorize,
deepcluster), and the pieces they have in common.

A pretext head is an `nn.Module` in `mmssl.heads.<name>` exported as `PRETEXT_HEAD`, built from the
model and its `heads.<name>` config section, with two methods the objective calls
(`mmssl.objective._pretext_term`):

* `draw(model, images, step) -> draw | None`: the step's random choices for the whole batch (tile
  permutations, crop offsets, sampled rows), made once per step so gradient accumulation slices
  them (`draw.rows(start, stop)`) instead of drawing again; None when the task draws nothing;
* `loss(model, images, draw, batch_size) -> scalar`: the sum of these rows' per-image losses divided
  by the whole batch's `batch_size`, so micro-batches add up to the batch mean (the objective's
  accumulation rule) and torchrun's gradient average is the global mean.

Each task reads the image tower's embedding (`model.visual(x)`, what `encode_image`, the index and
every evaluation read) unless it needs per-patch tokens, so the trained features are the probed ones.
Norms are LayerNorm, not BatchNorm: batch statistics would differ per micro-batch and per rank.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn


def embedding(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[B, D] the image tower's output embedding (not normalised)."""
    return model.visual(images)


def classifier(width: int, hidden: int, classes: int) -> nn.Module:
    """Linear (hidden 0) or one hidden layer with LayerNorm and ReLU, to `classes` logits."""
    if hidden == 0:
        return nn.Linear(width, classes)
    return nn.Sequential(nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, classes))


def batch_share(per_row: torch.Tensor, batch_size: int) -> torch.Tensor:
    """These rows' share of the whole batch's mean: sum / rows in the batch (all micro-batches)."""
    return per_row.float().sum() / batch_size


@dataclass
class RowDraw:
    """A draw whose fields are all per-row tensors (dim 0: the batch's rows)."""

    def rows(self, start: int, stop: int):
        return type(self)(**{f.name: getattr(self, f.name)[start:stop] for f in fields(self)})
