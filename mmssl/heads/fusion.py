"""A small transformer over caption tokens that cross-attends to image tokens (ALBEF / CoCa style).

Each block: self-attention over the caption (bidirectional for matching, causal for captioning),
cross-attention from every caption position to the image tokens, then an MLP; pre-LayerNorm with
residuals. The image tokens are projected to the caption width once. Used by the image-text
matching head (`mmssl.heads.itm`) and the caption decoder (`mmssl.heads.caption`).

Scoring many captions against few images (re-ranking, caption selection, beam search) repeats
images: `forward(..., image_index=...)` takes each distinct image once and says which image each
caption row reads, so the image side (its projection and every block's cross-attention keys and
values, the bulk of the work at 65 image tokens against ~16 caption tokens) is computed once per
image, not once per pair; `image_memory` returns that side for a caller to keep across calls.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    """Multi-head attention from caption positions to image tokens, with the image side apart."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key_value = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def memory(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [U, heads, T, width / heads] of the distinct images [U, T, width]."""
        rows, tokens, width = image.shape
        key, value = self.key_value(image).view(rows, tokens, 2, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        return key, value

    def forward(self, x: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        rows, length, width = x.shape
        query = self.query(x).view(rows, length, self.heads, width // self.heads).transpose(1, 2)
        attended = F.scaled_dot_product_attention(query, key, value)
        return self.out(attended.transpose(1, 2).reshape(rows, length, width))


class FusionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.ln_self = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_cross = nn.LayerNorm(width)
        self.cross_attn = CrossAttention(width, heads)
        self.ln_mlp = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, memory: tuple, image_index: Optional[torch.Tensor],
                padding: Optional[torch.Tensor], causal: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.ln_self(x)
        x = x + self.self_attn(h, h, h, key_padding_mask=padding, attn_mask=causal, need_weights=False)[0]
        key, value = memory
        if image_index is not None:
            key, value = key[image_index], value[image_index]
        x = x + self.cross_attn(self.ln_cross(x), key, value)
        return x + self.mlp(self.ln_mlp(x))


class Fusion(nn.Module):
    """`forward(text [N, L, width], valid [N, L] bool, image [U, T, image_width], image_index [N] | None)`
    -> [N, L, width]; without `image_index` row i reads image i (U = N)."""

    def __init__(self, width: int, image_width: int, depth: int, heads: int, causal: bool = False):
        super().__init__()
        self.causal = causal
        self.image_proj = nn.Sequential(nn.Linear(image_width, width), nn.LayerNorm(width))
        self.blocks = nn.ModuleList(FusionBlock(width, heads) for _ in range(depth))
        self.ln_final = nn.LayerNorm(width)

    def image_memory(self, image: torch.Tensor) -> list:
        """Every block's cross-attention keys and values of images [U, T, image_width]: all the
        image side, so a caller scoring the same images again may keep it (`memory=`)."""
        image = self.image_proj(image)
        return [block.cross_attn.memory(image) for block in self.blocks]

    def forward(self, text: torch.Tensor, valid: torch.Tensor, image: Optional[torch.Tensor],
                image_index: Optional[torch.Tensor] = None, memory: Optional[list] = None) -> torch.Tensor:
        memory = memory if memory is not None else self.image_memory(image.to(text.dtype))
        length = text.shape[1]
        causal = None
        if self.causal:
            causal = torch.ones(length, length, dtype=torch.bool, device=text.device).triu(1)
        padding = ~valid    # position 0 (start / class token) is always real, so no row is all padding
        x = text
        for block, block_memory in zip(self.blocks, memory):
            x = block(x, block_memory, image_index, padding, causal)
        return self.ln_final(x)
