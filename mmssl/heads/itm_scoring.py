"""Scoring (image, caption) pairs with a trained ITM head: caption selection and re-ranking.

`build_itm_scorer(checkpoint, loaded)` returns `score(loaded, images [B, 3, H, W], tokens [B, K, L])
-> [B, K]`: the ITM log-odds that caption k of row b describes image b. Each image goes through the
image tower once; its tokens are repeated for its K captions.
"""
from __future__ import annotations

import torch

from mmssl.heads.saved import load_head
from mmssl.models.tower_tokens import image_tokens, text_tokens, text_valid


def itm_pair_scores(model, head, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[B, K] match log-odds of `images` [B, 3, H, W] against `tokens` [B, K, L]."""
    rows, captions, length = tokens.shape
    image = image_tokens(model.visual, images).tokens
    flat = tokens.reshape(rows * captions, length)
    text = text_tokens(model, flat).tokens
    image_index = torch.arange(rows, device=images.device).repeat_interleave(captions)
    return head.match_score(image, text, text_valid(model, flat), image_index).reshape(rows, captions)


def build_itm_scorer(checkpoint: str, loaded):
    head = load_head(checkpoint, "itm", loaded.model)

    def score(loaded, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return itm_pair_scores(loaded.model, head, images, tokens)

    return score
