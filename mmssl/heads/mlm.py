"""Masked language modeling on the text tower (BERT: Devlin et al. 2019, arXiv:1810.04805).

Objective: pick `mask_prob` (15%) of the non-special, non-padding tokens; feed [MASK] at 80% of
them, a random token at 10%, the original at 10% (ratios configurable); run the text tower on
that masked text in its own bidirectional pass and minimise the cross-entropy of the original
token at the picked positions only. The contrastive branch never sees the masked text.

The prediction head is BERT's: dense -> GELU -> LayerNorm -> vocabulary projection, the last
tied to the tower's token embedding (plus a per-token bias). open_clip's tokenizer has no [MASK],
so for its native tower the head owns one learned mask embedding that replaces the token
embedding at [MASK] positions: the dual encoder's own weights keep their shapes and a checkpoint
loads for eval without the head.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmssl.config import MLMHeadConfig
from mmssl.heads.text_tower import TextVocab, text_tower


@dataclass
class MaskedText:
    inputs: torch.Tensor     # token ids fed to the masked pass
    selected: torch.Tensor   # bool: positions whose original token is predicted
    to_mask: torch.Tensor    # bool: selected positions fed [MASK] (or the mask embedding)
    count: int               # selected positions in the whole batch: the loss's normaliser

    def rows(self, start: int, stop: int) -> "MaskedText":
        """Rows start:stop, still normalised by the whole batch's count (so micro-batch losses add up)."""
        return MaskedText(self.inputs[start:stop], self.selected[start:stop], self.to_mask[start:stop], self.count)


def bert_mask(tokens: torch.Tensor, maskable: torch.Tensor, vocab: TextVocab, mask_prob: float = 0.15,
              replace_mask: float = 0.8, replace_random: float = 0.1) -> MaskedText:
    """BERT's corruption of a [B, L] batch; only `maskable` positions can be selected."""
    selected = maskable & (torch.rand(tokens.shape, device=tokens.device) < mask_prob)
    action = torch.rand(tokens.shape, device=tokens.device)
    to_mask = selected & (action < replace_mask)
    to_random = selected & (action >= replace_mask) & (action < replace_mask + replace_random)
    inputs = tokens.clone()
    if vocab.mask_id is not None:
        inputs[to_mask] = vocab.mask_id
    inputs[to_random] = _random_tokens(int(to_random.sum()), vocab, tokens.device)
    return MaskedText(inputs=inputs, selected=selected, to_mask=to_mask, count=int(selected.sum()))


def _random_tokens(count: int, vocab: TextVocab, device) -> torch.Tensor:
    """`count` ids drawn uniformly from the vocabulary without its special tokens."""
    allowed = torch.ones(vocab.size, dtype=torch.bool, device=device)
    allowed[list(vocab.special_ids)] = False
    ids = allowed.nonzero().squeeze(1)
    return ids[torch.randint(len(ids), (count,), device=device)]


class MLMHead(nn.Module):
    """BERT prediction head plus the masking; `forward(model, tokens)` returns the MLM loss.

    Configured by a `heads.mlm` section or its fields as keywords (`MLMHead(model, mask_prob=0.3)`).
    """

    def __init__(self, model: nn.Module, cfg: Optional[MLMHeadConfig] = None, **fields):
        super().__init__()
        cfg = replace(cfg or MLMHeadConfig(), **fields)  # the section validates its values
        self.mask_prob, self.replace_mask, self.replace_random = cfg.mask_prob, cfg.replace_mask, cfg.replace_random
        tower = text_tower(model)
        width = tower.width
        self.dense = nn.Linear(width, width)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(width)
        self.bias = nn.Parameter(torch.zeros(tower.vocab.size))
        self.mask_embedding = nn.Parameter(0.02 * torch.randn(width)) if tower.needs_mask_embedding else None

    def mask(self, model: nn.Module, tokens: torch.Tensor) -> MaskedText:
        tower = text_tower(model)
        return bert_mask(tokens, tower.maskable(tokens), tower.vocab,
                         self.mask_prob, self.replace_mask, self.replace_random)

    def forward(self, model: nn.Module, tokens: torch.Tensor, masked: Optional[MaskedText] = None) -> torch.Tensor:
        """Cross-entropy at the selected positions, summed and divided by `masked.count` (drawn here if None)."""
        tower = text_tower(model)
        masked = masked if masked is not None else self.mask(model, tokens)
        states = tower.hidden_states(masked.inputs, tokens, masked.to_mask, self.mask_embedding)
        logits = self.predict(states[masked.selected], tower.output_embedding)
        targets = tokens[masked.selected]
        if targets.numel() == 0:  # nothing picked in these rows: a zero that keeps the graph
            return logits.sum() * 0.0
        return F.cross_entropy(logits.float(), targets, reduction="sum") / max(masked.count, 1)

    def predict(self, states: torch.Tensor, output_embedding: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits for [N, width] states, projection tied to the token embedding."""
        hidden = self.norm(self.act(self.dense(states.to(self.dense.weight.dtype))))
        return hidden @ output_embedding.to(hidden.dtype).t() + self.bias
