"""RotNet (Gidaris et al. 2018, arXiv:1803.07728): predict by how much an image was turned.

Every image of the batch is shown four times, turned by 0, 90, 180 and 270 degrees
(`torch.rot90`, counter-clockwise, k quarter turns), and a classifier on the image tower's
embedding names the turn: 4-way cross-entropy averaged over the four copies. Gidaris et al. found
feeding all four copies together better than one random turn per image; it costs four tower passes
per image. Nothing is drawn at random. Images must be square (every tower here is).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmssl.config import RotationHeadConfig
from mmssl.heads.pretext import batch_share, classifier, embedding

TURNS = 4


def rotated_copies(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([4B, C, H, W] the batch turned k = 0..3 quarter turns, k-major; [4B] the labels k)."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotation needs square images, got {tuple(images.shape[-2:])}")
    turned = torch.cat([torch.rot90(images, k, dims=(-2, -1)) for k in range(TURNS)])
    labels = torch.arange(TURNS, device=images.device).repeat_interleave(images.shape[0])
    return turned, labels


class RotationHead(nn.Module):
    """4-way classifier of the turn, on the image tower's embedding."""

    def __init__(self, model: nn.Module, cfg: RotationHeadConfig):
        super().__init__()
        self.classify = classifier(model.visual.output_dim, cfg.hidden_dim, TURNS)

    def draw(self, model: nn.Module, images: torch.Tensor, step) -> None:
        return None

    def logits(self, model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        turned, labels = rotated_copies(images)
        return self.classify(embedding(model, turned)), labels

    def loss(self, model: nn.Module, images: torch.Tensor, draw, batch_size: int) -> torch.Tensor:
        logits, labels = self.logits(model, images)
        per_row = F.cross_entropy(logits.float(), labels, reduction="none").view(TURNS, -1).mean(0)
        return batch_share(per_row, batch_size)


PRETEXT_HEAD = RotationHead
