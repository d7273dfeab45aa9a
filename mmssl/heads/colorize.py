"""Colourization (Zhang, Isola and Efros 2016, arXiv:1603.08511): the colour of each patch from the
grayscale image, as per-patch regression with a light decoder (like the inpainting head's).

The batch arrives normalised by the model's preprocessing (`get_model_preprocess_cfg(model)`'s
mean and std, open_clip's OPENAI_DATASET_MEAN / STD when it has none). Each image is un-normalised
to sRGB, clamped to [0, 1] (random or augmented inputs can leave it), and converted to CIE Lab
(sRGB primaries, D65 white, written here in torch: `rgb_to_lab`). The tower sees the image's
lightness only: the sRGB gray with the same L, i.e. Lab -> sRGB at a = b = 0 (`grayscale`; that
gray is the gamma-compressed relative luminance Y, the same value in R, G and B), normalised again
with the model's mean and std.

Target (`heads.colorize.target`): `ab`, the Lab colour channels divided by `AB_SCALE` = 110 (sRGB
colours have |a|, |b| < 110: blue's b is -107.9), or `rgb`, the original sRGB in [0, 1]. The
tower's spatial token grid (g x g: a ViT's patch tokens, a ModifiedResNet's last feature-map cells,
from `mmssl.models.tower_tokens.image_tokens`, which puts a pooled token first: dropped here) gives
each token an image area; its target is the target map average-pooled to (g r, g r) and cut into
r x r blocks (`colour_targets`), r the patch side for a ViT (no pooling: the pixels themselves) and
`RESNET_CELL` = 4 for a ResNet. The decoder (`ColorDecoder`) maps each token to those r r C values:

    Linear(token width, decoder_width) + learned position embedding (g g positions)
    + heads.colorize.decoder_depth transformer blocks (0: a per-token MLP) + LayerNorm + Linear

Loss: per image, the mean squared error over its tokens and values; `batch_share` of those. Nothing
is drawn at random (`draw` returns None), so gradient accumulation is exact by construction.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from open_clip.transformer import Transformer
from torch import nn

from mmssl.config import ColorizeHeadConfig
from mmssl.errors import UserError
from mmssl.heads.pretext import batch_share, normalisation, vit_patch_grid
from mmssl.heads.vit_tokens import patchify
from mmssl.models.tower_tokens import image_token_width, image_tokens

AB_SCALE = 110.0        # target ab = Lab (a, b) / AB_SCALE: about [-1, 1] for sRGB colours
RESNET_CELL = 4         # target pixels per side of each ResNet feature-map cell

# linear sRGB -> CIE XYZ (IEC 61966-2-1, D65); the reference white is its row sums (R = G = B = 1),
# so every gray R = G = B has a = b = 0 exactly
SRGB_TO_XYZ = torch.tensor([[0.4124564, 0.3575761, 0.1804375],
                            [0.2126729, 0.7151522, 0.0721750],
                            [0.0193339, 0.1191920, 0.9503041]], dtype=torch.float64)
WHITE = SRGB_TO_XYZ.sum(dim=1)                         # D65: (0.95047, 1.0, 1.08883)
XYZ_TO_SRGB = torch.linalg.inv(SRGB_TO_XYZ)
_DELTA = 6.0 / 29.0                                    # CIE Lab's linear-segment joint


def _matrix(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The 3x3 `matrix` applied to the channel dimension (-3) of `x` [..., 3, H, W]."""
    return torch.einsum("ij,...jhw->...ihw", matrix.to(device=x.device, dtype=x.dtype), x)


def _white(x: torch.Tensor) -> torch.Tensor:
    return WHITE.to(device=x.device, dtype=x.dtype).view(3, 1, 1)


def srgb_to_linear(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB gamma expansion of values in [0, 1]."""
    rgb = rgb.clamp(0.0, 1.0)
    return torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(linear: torch.Tensor) -> torch.Tensor:
    """sRGB gamma compression, clamped to [0, 1]."""
    linear = linear.clamp(0.0, 1.0)
    return torch.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1.0 / 2.4) - 0.055)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] sRGB in [0, 1] (clamped) -> CIE Lab (L in [0, 100]), in fp32 (fp64 stays fp64)."""
    rgb = rgb.float() if rgb.dtype != torch.float64 else rgb
    t = _matrix(SRGB_TO_XYZ, srgb_to_linear(rgb)) / _white(rgb)
    f = torch.where(t > _DELTA ** 3, t.clamp(min=_DELTA ** 3) ** (1.0 / 3.0), t / (3 * _DELTA ** 2) + 4.0 / 29.0)
    fx, fy, fz = f.unbind(dim=-3)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=-3)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """The inverse of `rgb_to_lab`: [..., 3, H, W] Lab -> sRGB, clamped to [0, 1]."""
    lab = lab.float() if lab.dtype != torch.float64 else lab
    light, a, b = lab.unbind(dim=-3)
    fy = (light + 16.0) / 116.0
    f = torch.stack([fy + a / 500.0, fy, fy - b / 200.0], dim=-3)
    t = torch.where(f > _DELTA, f ** 3, 3 * _DELTA ** 2 * (f - 4.0 / 29.0))
    return linear_to_srgb(_matrix(XYZ_TO_SRGB, t * _white(lab)))


def grayscale(rgb: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] sRGB -> the sRGB gray of the same Lab lightness (Lab -> sRGB at a = b = 0),
    in all three channels."""
    lab = rgb_to_lab(rgb)
    return lab_to_rgb(torch.cat([lab[..., :1, :, :], torch.zeros_like(lab[..., 1:, :, :])], dim=-3))


def colour_targets(rgb: torch.Tensor, target: str, grid: int, cell: int) -> torch.Tensor:
    """[B, grid*grid, cell*cell*C] each token's target: the target map (`ab`: Lab a, b / AB_SCALE,
    C = 2 | `rgb`: sRGB in [0, 1], C = 3) average-pooled to (grid*cell)^2 pixels, cut into
    cell x cell blocks in the tokens' row-major order, each block's values (row, column, channel)."""
    if target == "ab":
        values = rgb_to_lab(rgb)[:, 1:] / AB_SCALE
    elif target == "rgb":
        values = rgb.float().clamp(0.0, 1.0)
    else:
        raise ValueError(f"unknown colourization target {target!r}")
    side = grid * cell
    if values.shape[-2:] != (side, side):
        values = F.adaptive_avg_pool2d(values, (side, side))
    return patchify(values, cell)


def token_grid(visual: nn.Module) -> tuple[int, int]:
    """(g, r): the side of the tower's square token grid and the target pixels per token side."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        grid, why = vit_patch_grid(visual)
        if grid is None or visual.patch_size[0] != visual.patch_size[1]:
            raise UserError(f"the colourization head (heads.colorize) predicts the colour of every patch token: "
                            f"{why or 'it needs square patches'}")
        return grid, visual.patch_size[0]
    if isinstance(visual, ModifiedResNet):
        cells = visual.attnpool.positional_embedding.shape[0] - 1     # the last feature map's h*w
        side = math.isqrt(cells)
        if side * side != cells:
            raise UserError("the colourization head needs a square final feature map")
        return side, RESNET_CELL
    raise UserError(f"the colourization head (heads.colorize) needs an open_clip ViT or ModifiedResNet image "
                    f"tower; this model's is {type(visual).__name__}")


class ColorDecoder(nn.Module):
    """Spatial tokens [B, g*g, token width] -> [B, g*g, outputs] per-token colour predictions."""

    def __init__(self, token_width: int, positions: int, outputs: int, width: int = 128, depth: int = 1,
                 heads: int = 4):
        super().__init__()
        self.embed = nn.Linear(token_width, width)
        self.pos_embed = nn.Parameter(0.02 * torch.randn(positions, width))
        self.blocks = Transformer(width, depth, heads)
        self.norm = nn.LayerNorm(width)
        self.pred = nn.Linear(width, outputs)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos_embed.to(tokens.dtype)
        return self.pred(self.norm(self.blocks(x)))


class ColorizeHead(nn.Module):
    """The grayscale input, the per-token colour targets, the decoder and the loss."""

    def __init__(self, model: nn.Module, cfg: ColorizeHeadConfig):
        super().__init__()
        self.grid, self.cell = token_grid(model.visual)
        self.target = cfg.target
        self.channels = 2 if cfg.target == "ab" else 3
        mean, std = normalisation(model)
        self.register_buffer("mean", mean, persistent=False)   # the model's: recomputed, never saved
        self.register_buffer("std", std, persistent=False)
        self.decoder = ColorDecoder(image_token_width(model.visual), self.grid * self.grid,
                                    self.cell * self.cell * self.channels, cfg.decoder_width,
                                    cfg.decoder_depth, cfg.decoder_heads)

    def draw(self, model: nn.Module, images: torch.Tensor, step) -> None:
        return None

    def rgb(self, images: torch.Tensor) -> torch.Tensor:
        """The normalised batch back to sRGB, clamped to [0, 1], fp32."""
        return (images.float() * self.std + self.mean).clamp(0.0, 1.0)

    def gray_input(self, images: torch.Tensor) -> torch.Tensor:
        """What the tower sees: the L-preserving gray of each image, normalised like the batch."""
        return ((grayscale(self.rgb(images)) - self.mean) / self.std).to(images.dtype)

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """[B, g*g, r*r*C] each token's target (see `colour_targets`)."""
        return colour_targets(self.rgb(images), self.target, self.grid, self.cell)

    def predict(self, model: nn.Module, gray: torch.Tensor) -> torch.Tensor:
        """[B, g*g, r*r*C] the decoder's colours from the tower's spatial tokens of `gray`."""
        tokens = image_tokens(model.visual, gray).tokens
        positions = self.grid * self.grid
        if tokens.shape[1] != positions + 1:
            raise UserError(f"the colourization head expects {positions} spatial tokens (a {self.grid}x{self.grid} "
                            f"grid) from the image tower, got {tokens.shape[1] - 1}: are the images "
                            "the model's size?")
        return self.decoder(tokens[:, 1:])       # the first token is the pooled one

    def loss(self, model: nn.Module, images: torch.Tensor, draw, batch_size: int) -> torch.Tensor:
        with torch.no_grad():
            gray, target = self.gray_input(images), self.targets(images)
        pred = self.predict(model, gray)
        per_row = (pred.float() - target).pow(2).mean(dim=(1, 2))
        return batch_share(per_row, batch_size)


PRETEXT_HEAD = ColorizeHead
