"""Image-text matching on hard negatives (ALBEF: Li et al. 2021, arXiv:2107.07651).

The multimodal counterpart of BERT's next-sentence prediction: a fusion encoder
(`mmssl.heads.fusion`, bidirectional) reads the caption's token states with cross-attention to the
image's tokens, and a 2-way classifier on its first position answers "does this caption describe
this image?". Each step scores the batch's B positive pairs, and for every image one negative
caption, for every caption one negative image, each drawn from the batch with probability
softmax(contrastive logits) over the candidates that are not its positive (a caption identical to
the positive's counts as a positive). Loss: cross-entropy over those up to 3B pairs.

The uniform numbers the sampling inverts are drawn in the objective's `draw` from the global RNG,
like every other random draw, so a resumed or accumulated step samples what the plain step does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmssl.config import ItmHeadConfig
from mmssl.heads.fusion import Fusion
from mmssl.models.tower_tokens import image_token_width, text_token_width


@dataclass
class ItmDraw:
    """A step's ITM draw for the whole batch: which captions are the same, and the sampling's uniforms."""

    same: torch.Tensor          # [B, B] bool: caption i == caption j (positives of each other)
    valid: torch.Tensor         # [B, L] bool: real caption tokens
    uniform_text: torch.Tensor  # [B] in [0, 1): picks each image's negative caption
    uniform_image: torch.Tensor # [B] in [0, 1): picks each caption's negative image

    def rows(self, start: int, stop: int) -> "ItmDraw":
        return self     # a batch term: computed on the whole batch only


def draw_itm(texts: torch.Tensor, valid: torch.Tensor) -> ItmDraw:
    same = (texts[:, None, :] == texts[None, :, :]).all(-1)
    batch = texts.shape[0]
    return ItmDraw(same, valid, torch.rand(batch, device=texts.device), torch.rand(batch, device=texts.device))


def hard_negatives(logits: torch.Tensor, same: torch.Tensor, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row i, a column j with `same[i, j]` False drawn with probability softmax(logits[i])
    restricted to those columns (inverse CDF at `uniform[i]`). Returns (index [B], has [B]); a row
    whose every column is a positive has no negative (`has` False, its index meaningless)."""
    has = (~same).any(dim=1)
    weights = torch.softmax(logits.float().masked_fill(same, float("-inf")), dim=1)
    weights = torch.where(has[:, None], weights, torch.zeros_like(weights))
    cdf = weights.cumsum(dim=1)
    # first column whose cdf exceeds u * total: a zero-weight (positive) column is never chosen
    index = torch.searchsorted(cdf, (uniform.float() * cdf[:, -1])[:, None], right=True).squeeze(1)
    return index.clamp(max=logits.shape[1] - 1), has


def _text_heads(model: nn.Module) -> int:
    text = getattr(model, "text", None)
    config = getattr(text, "config", None)
    if config is not None and hasattr(config, "num_attention_heads"):
        return config.num_attention_heads
    tower = text if text is not None and hasattr(text, "transformer") else model
    return tower.transformer.resblocks[0].attn.num_heads


class ITMHead(nn.Module):
    """Fusion encoder + 2-way classifier; `forward(image_tokens, text_tokens, valid)` -> logits [N, 2]
    (class 1: the caption matches the image)."""

    def __init__(self, model: nn.Module, cfg: ItmHeadConfig = ItmHeadConfig()):
        super().__init__()
        width = text_token_width(model)
        self.fusion = Fusion(width, image_token_width(model.visual), cfg.layers, cfg.heads or _text_heads(model))
        self.classifier = nn.Linear(width, 2)

    def forward(self, image_tokens: torch.Tensor | None, text_tokens: torch.Tensor, valid: torch.Tensor,
                image_index: torch.Tensor | None = None, memory: list | None = None) -> torch.Tensor:
        """Logits [N, 2] of N captions against `image_tokens` [U, T, width]: caption i against image
        `image_index[i]` (each distinct image's side computed once), or image i without it;
        `memory` (`fusion.image_memory` of those images) replaces `image_tokens`."""
        used = int(valid.any(dim=0).nonzero().max()) + 1 if valid.any() else 1   # drop all-padding columns
        fused = self.fusion(text_tokens[:, :used], valid[:, :used], image_tokens, image_index, memory)
        return self.classifier(fused[:, 0])

    def match_score(self, image_tokens: torch.Tensor | None, text_tokens: torch.Tensor, valid: torch.Tensor,
                    image_index: torch.Tensor | None = None, memory: list | None = None) -> torch.Tensor:
        """[N] log-odds that each caption matches its image (logit 1 - logit 0)."""
        logits = self(image_tokens, text_tokens, valid, image_index, memory).float()
        return logits[:, 1] - logits[:, 0]

    def loss(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, logits_per_image: torch.Tensor,
             draw: ItmDraw) -> torch.Tensor:
        """ITM cross-entropy of the batch's positives and its sampled hard negatives."""
        batch = image_tokens.shape[0]
        rows = torch.arange(batch, device=image_tokens.device)
        with torch.no_grad():
            negative_text, has_text = hard_negatives(logits_per_image, draw.same, draw.uniform_text)
            negative_image, has_image = hard_negatives(logits_per_image.t(), draw.same.t(), draw.uniform_image)
        image_index = torch.cat([rows, rows[has_text], negative_image[has_image]])
        text_index = torch.cat([rows, negative_text[has_text], rows[has_image]])
        labels = torch.zeros(len(image_index), dtype=torch.long, device=image_tokens.device)
        labels[:batch] = 1
        logits = self(image_tokens, text_tokens[text_index], draw.valid[text_index], image_index)
        return F.cross_entropy(logits.float(), labels)
