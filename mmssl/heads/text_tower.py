"""Per-token states from a dual encoder's text tower, with full (bidirectional) attention.

Why: masked language modeling needs a hidden state for every position and lets each token see
both sides, whereas CLIP's text tower is causal and pools one token. This module is the one place
that knows how to run either kind of tower that way: open_clip's native text transformer (inside
`CLIP` or `CustomTextCLIP.text`) and a Hugging Face tower (`open_clip.hf_model.HFTextEncoder`).
An adapter holds references to the model's own modules and owns no parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from mmssl.errors import UserError


@dataclass(frozen=True)
class TextVocab:
    """What masking needs to know about a tokenizer's vocabulary."""

    size: int                    # rows of the token embedding (the MLM output classes)
    mask_id: Optional[int]       # the tokenizer's [MASK] id; None: the tower has none (open_clip)
    special_ids: tuple           # never selected for masking, never drawn as random replacements
    pad_id: int


class NativeTextTower:
    """open_clip's own text transformer, run without its causal mask.

    Its tokenizer has no [MASK] token, so masked positions get a learned embedding (owned by the
    MLM head) in place of the token embedding. Maskable tokens lie strictly between SOT and the
    first EOT; everything after EOT is padding and is hidden from attention as a key.
    """

    needs_mask_embedding = True

    def __init__(self, model: nn.Module):
        text = model.text if hasattr(model, "text") else model
        if getattr(text, "cls_emb", None) is not None:
            raise UserError("the MLM head does not support text towers with an appended class token (CoCa-style)")
        self.token_embedding = text.token_embedding
        self.positional_embedding = text.positional_embedding
        self.transformer = text.transformer
        self.ln_final = text.ln_final
        self.width = self.token_embedding.embedding_dim
        self.num_heads = self.transformer.resblocks[0].attn.num_heads
        size = self.token_embedding.num_embeddings
        tokenizer = getattr(model, "tokenizer", None)
        self.sot_id = getattr(tokenizer, "sot_token_id", size - 2)
        self.eot_id = getattr(tokenizer, "eot_token_id", size - 1)
        self.vocab = TextVocab(size=size, mask_id=None, special_ids=(self.sot_id, self.eot_id), pad_id=0)

    @property
    def output_embedding(self) -> torch.Tensor:
        return self.token_embedding.weight

    def _eot_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        is_eot = tokens == self.eot_id
        # a row truncated without EOT keeps every position (argmax of all-False is 0: fix that up)
        last = torch.full_like(tokens[:, 0], tokens.shape[1])
        return torch.where(is_eot.any(1), is_eot.int().argmax(1), last)

    def maskable(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return (positions > 0) & (positions < self._eot_positions(tokens)[:, None])

    def hidden_states(self, inputs: torch.Tensor, tokens: torch.Tensor, masked: torch.Tensor,
                      mask_embedding: torch.Tensor) -> torch.Tensor:
        """[B, L, width] states of `inputs`, `masked` positions fed `mask_embedding` instead."""
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(inputs).to(cast_dtype)
        x = torch.where(masked[..., None], mask_embedding.to(cast_dtype), x)
        x = x + self.positional_embedding[: x.shape[1]].to(cast_dtype)
        x = self.transformer(x, attn_mask=self._padding_mask(tokens, x.dtype))
        return self.ln_final(x)

    def _padding_mask(self, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive [B*heads, L, L] mask hiding padding keys; no causal part."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        is_pad = positions[None, :] > self._eot_positions(tokens)[:, None]
        mask = torch.zeros(is_pad.shape, dtype=dtype, device=tokens.device).masked_fill(is_pad, float("-inf"))
        mask = mask[:, None, :].expand(-1, tokens.shape[1], -1)
        return mask.repeat_interleave(self.num_heads, 0)


class HFTextTower:
    """A Hugging Face encoder used as the text tower: already bidirectional, with its own [MASK]."""

    needs_mask_embedding = False

    def __init__(self, model: nn.Module):
        encoder = model.text
        hf_tokenizer = getattr(getattr(model, "tokenizer", None), "tokenizer", None)
        if hf_tokenizer is None or hf_tokenizer.mask_token_id is None:
            raise UserError("the MLM head needs the Hugging Face tokenizer's [MASK] token (model.tokenizer.tokenizer)")
        self.transformer = encoder.transformer
        self.word_embeddings = self.transformer.get_input_embeddings()
        self.width = self.word_embeddings.embedding_dim
        self.vocab = TextVocab(
            size=self.word_embeddings.num_embeddings,
            mask_id=hf_tokenizer.mask_token_id,
            special_ids=tuple(sorted(set(hf_tokenizer.all_special_ids))),
            pad_id=encoder.config.pad_token_id,
        )

    @property
    def output_embedding(self) -> torch.Tensor:
        return self.word_embeddings.weight

    def maskable(self, tokens: torch.Tensor) -> torch.Tensor:
        special = torch.tensor(self.vocab.special_ids, device=tokens.device)
        return ~torch.isin(tokens, special)

    def hidden_states(self, inputs: torch.Tensor, tokens: torch.Tensor, masked: torch.Tensor,
                      mask_embedding: Optional[torch.Tensor] = None) -> torch.Tensor:
        attention = (tokens != self.vocab.pad_id).long()
        return self.transformer(input_ids=inputs, attention_mask=attention).last_hidden_state


def text_tower(model: nn.Module):
    """The adapter for `model`'s text tower."""
    from open_clip.hf_model import HFTextEncoder

    if isinstance(getattr(model, "text", None), HFTextEncoder):
        return HFTextTower(model)
    return NativeTextTower(model)
