"""Masked-image inpainting on a ViT image tower (MAE: He et al. 2022, arXiv:2111.06377).

Objective: hide a random `mask_ratio` (75%) of the patches of each image, encode only the visible
ones, and let a light transformer decoder - visible tokens plus a shared learned mask token at
every hidden position, each with a fixed 2-D sin-cos position embedding - predict the pixels of
the hidden patches. The loss is the mean squared error over hidden patches only; with
`norm_pix_loss` each target patch is normalised by its own mean and variance (MAE's default,
which gives sharper features).

Two ways to combine with the contrastive loss (chosen by the objective, see
`mmssl.objective`): `separate` gives the masked image its own encoder pass, and `shared`
(FLIP: Li et al. 2023, arXiv:2212.00794) feeds the same visible-patch encoding to the contrastive
loss too, so the reconstruction comes almost for free.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from open_clip.pos_embed import get_2d_sincos_pos_embed
from open_clip.transformer import Transformer
from torch import nn

from mmssl.config import InpaintHeadConfig
from mmssl.errors import require
from mmssl.heads.vit_tokens import VisibleEncoding, encode_visible, num_patches, patch_size, patchify, require_vit


@dataclass
class PatchMask:
    keep: torch.Tensor     # [B, K] indices of visible patches, ascending
    masked: torch.Tensor   # [B, N] bool, True where the patch is hidden
    count: int             # hidden patches in the whole batch: the loss's normaliser

    def rows(self, start: int, stop: int) -> "PatchMask":
        """Rows start:stop, still normalised by the whole batch's count (so micro-batch losses add up)."""
        return PatchMask(self.keep[start:stop], self.masked[start:stop], self.count)


def random_patch_mask(batch: int, patches: int, mask_ratio: float, device=None) -> PatchMask:
    """Hide the same number of patches in every image, chosen uniformly at random per image."""
    num_keep = max(1, int(patches * (1.0 - mask_ratio)))
    noise = torch.rand(batch, patches, device=device)
    keep = noise.argsort(dim=1)[:, :num_keep].sort(dim=1).values
    masked = torch.ones(batch, patches, dtype=torch.bool, device=device)
    masked.scatter_(1, keep, False)
    return PatchMask(keep=keep, masked=masked, count=batch * (patches - num_keep))


def masked_patch_loss(pred: torch.Tensor, images: torch.Tensor, masked: torch.Tensor, patch: int,
                      norm_pix_loss: bool = True, count: Optional[int] = None) -> torch.Tensor:
    """Mean over hidden patches of the per-patch MSE between `pred` [B, N, p*p*3] and the pixels.

    `count` is the number of hidden patches to divide by (default: those in `masked`).
    """
    target = patchify(images, patch).float()
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)
    weights = masked.to(per_patch.dtype)
    denominator = weights.sum().clamp(min=1.0) if count is None else max(count, 1)
    return (per_patch * weights).sum() / denominator


class MAEDecoder(nn.Module):
    """Visible-token states [B, 1+K, enc_width] -> pixel predictions for all N patches."""

    def __init__(self, enc_width: int, grid: int, patch: int, width: int = 128, depth: int = 2, heads: int = 4):
        super().__init__()
        self.embed = nn.Linear(enc_width, width)
        self.mask_token = nn.Parameter(0.02 * torch.randn(width))
        pos = torch.from_numpy(get_2d_sincos_pos_embed(width, grid, cls_token=True)).float()
        self.register_buffer("pos_embed", pos, persistent=False)  # fixed: recomputed, never saved
        self.blocks = Transformer(width, depth, heads)
        self.norm = nn.LayerNorm(width)
        self.pred = nn.Linear(width, patch * patch * 3)

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        cls, visible = x[:, :1], x[:, 1:]
        patches = self.pos_embed.shape[0] - 1
        full = self.mask_token.to(x.dtype).expand(x.shape[0], patches, -1)
        full = full.scatter(1, keep[..., None].expand(-1, -1, x.shape[-1]), visible)
        x = torch.cat([cls, full], dim=1) + self.pos_embed.to(x.dtype)
        x = self.norm(self.blocks(x))
        return self.pred(x[:, 1:])


class InpaintHead(nn.Module):
    """Patch masking, the MAE decoder and the loss; `forward(model, images)` is the separate mode.

    Configured by a `heads.inpaint` section or its fields as keywords (`InpaintHead(model, mask_ratio=0.5)`).
    """

    def __init__(self, model: nn.Module, cfg: Optional[InpaintHeadConfig] = None, **fields):
        super().__init__()
        cfg = replace(cfg or InpaintHeadConfig(), **fields)  # the section validates its values
        visual = model.visual
        require_vit(visual, "the inpainting head (loss.inpaint_weight > 0)")
        require(visual.grid_size[0] == visual.grid_size[1], "the inpainting head needs a square patch grid")
        self.mask_ratio = cfg.mask_ratio
        self.norm_pix_loss = cfg.norm_pix_loss
        self.patch = patch_size(visual)
        self.decoder = MAEDecoder(visual.transformer.width, visual.grid_size[0], self.patch,
                                  cfg.decoder_width, cfg.decoder_depth, cfg.decoder_heads)

    def sample_mask(self, model: nn.Module, images: torch.Tensor) -> PatchMask:
        return random_patch_mask(images.shape[0], num_patches(model.visual), self.mask_ratio, images.device)

    def reconstruction_loss(self, images: torch.Tensor, encoding: VisibleEncoding, mask: PatchMask) -> torch.Tensor:
        pred = self.decoder(encoding.tokens, mask.keep)
        return masked_patch_loss(pred, images, mask.masked, self.patch, self.norm_pix_loss, mask.count)

    def forward(self, model: nn.Module, images: torch.Tensor, mask: Optional[PatchMask] = None) -> torch.Tensor:
        """The reconstruction loss of `images` under `mask` (drawn here if None), from its own encoder pass."""
        mask = mask if mask is not None else self.sample_mask(model, images)
        encoding = encode_visible(model.visual, images, mask.keep)
        return self.reconstruction_loss(images, encoding, mask)
