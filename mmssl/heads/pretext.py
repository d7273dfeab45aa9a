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
from typing import Optional

import torch
from torch import nn


def embedding(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[B, D] the image tower's output embedding (not normalised)."""
    return model.visual(images)


def normalisation(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """([3, 1, 1], [3, 1, 1]) fp32: the mean and std the model's preprocessing normalises pixels with
    (open_clip's OpenAI values when it records none)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from open_clip.model import get_model_preprocess_cfg

    cfg = get_model_preprocess_cfg(model)
    mean, std = cfg.get("mean", OPENAI_DATASET_MEAN), cfg.get("std", OPENAI_DATASET_STD)
    return (torch.tensor(mean, dtype=torch.float32).view(3, 1, 1),
            torch.tensor(std, dtype=torch.float32).view(3, 1, 1))


def vit_patch_grid(visual: nn.Module) -> tuple[Optional[int], str]:
    """(g, "") when the tower is a ViT whose patch tokens cover a square g x g grid one to one ('tok'
    or 'avg' pooling, no patch dropout), else (None, why not): what per-patch pretext heads need."""
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer):
        return None, f"the image tower is a {type(visual).__name__}, not a ViT"
    if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg"):
        return None, "the ViT pools attentionally (it needs 'tok' or 'avg' pooling)"
    if not isinstance(getattr(visual, "patch_dropout", nn.Identity()), nn.Identity):
        return None, "the ViT drops patches: set model.patch_dropout=0"
    gh, gw = visual.grid_size
    if gh != gw:
        return None, f"the ViT's patch grid is {gh}x{gw}, not square"
    return gh, ""


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
