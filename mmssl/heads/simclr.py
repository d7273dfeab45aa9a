"""SimCLR's projection head on the image tower (SLIP: Mu et al. 2021, arXiv:2112.12750).

SLIP puts a 3-layer MLP on the ViT's pooled output (before the CLIP projection): width 768 ->
4096 -> 4096 -> 256 at ViT-B, and computes NT-Xent (`mmssl.losses.SimCLRLoss`) on the outputs
for two augmented views of each image. Sizes here keep SLIP's ratios to the tower width, so the
head stays in proportion on the tiny CPU configs: hidden = 16/3 x width (4096 at 768; 1024 for
tiny-vit-64's 192) and out = width / 3 (256 at 768; 64 at 192), each rounded up to a multiple of
8; `heads.simclr.hidden_dim` / `out_dim` set them explicitly.

Input (`heads.simclr.input`): SLIP's pooled output (before the image projection) beside an
image-text loss; for image-only training (`loss.kind=simclr`) the tower's projected embedding,
so the projection is trained as the backbone's last layer and the features every evaluation,
index and fine-tune read (`encode_image`) are the trained ones ("auto" picks this way).

One deliberate change: LayerNorm where SLIP has (Sync)BatchNorm. Batch statistics would make
each micro-batch of gradient accumulation, and each rank, normalise differently from the whole
batch, so neither would equal the full-batch step; a per-sample norm keeps both exact.
"""
from __future__ import annotations

import torch
from torch import nn

from mmssl.config import SimCLRHeadConfig
from mmssl.heads.vit_tokens import pooled_output, pooled_width


def slip_sizes(width: int, cfg: SimCLRHeadConfig) -> tuple[int, int]:
    """(hidden, out) of the MLP for a tower of this pooled width."""
    def up8(value: float) -> int:
        return max(8, -(-int(round(value)) // 8) * 8)

    return cfg.hidden_dim or up8(width * 16 / 3), cfg.out_dim or up8(width / 3)


class SimCLRHead(nn.Module):
    """MLP from the image tower's pooled output to the space NT-Xent contrasts in."""

    def __init__(self, model: nn.Module, cfg: SimCLRHeadConfig):
        super().__init__()
        self.projected = cfg.input == "projected"   # "auto" is resolved by the objective (mmssl.objective)
        width = model.visual.output_dim if self.projected else pooled_width(model.visual, model.visual.output_dim)
        hidden, out = slip_sizes(width, cfg)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, out),
        )

    def forward(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] views -> [B, out] projections (not normalised: the loss does that)."""
        return self.mlp(model.visual(images) if self.projected else pooled_output(model.visual, images))
