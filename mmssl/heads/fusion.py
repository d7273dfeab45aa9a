"""A small transformer over caption tokens that cross-attends to image tokens (ALBEF / CoCa style).

Each block: self-attention over the caption (bidirectional for matching, causal for captioning),
cross-attention from every caption position to the image tokens, then an MLP; pre-LayerNorm with
residuals. The image tokens are projected to the caption width once. Used by the image-text
matching head (`mmssl.heads.itm`) and the caption decoder (`mmssl.heads.caption`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class FusionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.ln_self = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_cross = nn.LayerNorm(width)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_mlp = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, image: torch.Tensor, padding: Optional[torch.Tensor],
                causal: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.ln_self(x)
        x = x + self.self_attn(h, h, h, key_padding_mask=padding, attn_mask=causal, need_weights=False)[0]
        h = self.ln_cross(x)
        x = x + self.cross_attn(h, image, image, need_weights=False)[0]
        return x + self.mlp(self.ln_mlp(x))


class Fusion(nn.Module):
    """`forward(text [B, L, width], valid [B, L] bool, image [B, T, image_width])` -> [B, L, width]."""

    def __init__(self, width: int, image_width: int, depth: int, heads: int, causal: bool = False):
        super().__init__()
        self.causal = causal
        self.image_proj = nn.Sequential(nn.Linear(image_width, width), nn.LayerNorm(width))
        self.blocks = nn.ModuleList(FusionBlock(width, heads) for _ in range(depth))
        self.ln_final = nn.LayerNorm(width)

    def forward(self, text: torch.Tensor, valid: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        image = self.image_proj(image.to(text.dtype))
        length = text.shape[1]
        causal = None
        if self.causal:
            causal = torch.ones(length, length, dtype=torch.bool, device=text.device).triu(1)
        padding = ~valid    # position 0 (start / class token) is always real, so no row is all padding
        x = text
        for block in self.blocks:
            x = block(x, image, padding, causal)
        return self.ln_final(x)
