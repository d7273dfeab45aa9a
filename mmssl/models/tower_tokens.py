"""Both towers' per-token states, from the same forward pass that gives their pooled features.

Why: the fusion heads (image-text matching, captioning) read the image's patch tokens and the
caption's token states, while the contrastive loss reads the pooled, projected features. Running
each tower once and keeping both costs nothing extra; this module is the one place that knows
where those states live in each tower mmssl builds:

* open_clip's ViT: the final states of every patch (after `ln_post`), with the pooled output
  before its projection as the first token;
* open_clip's ModifiedResNet: the cells of the last feature map (`layer4`), with their mean (the
  attention pool's query) as the first token;
* open_clip's native text transformer: every position after `ln_final` (causal, as the tower is),
  computed on the batch's trimmed columns and padded back to the full context length with zeros;
* a Hugging Face text tower: its last hidden states;
* open_clip's `CoCa` (pass the model, not its tower): exactly what its own `_encode_image` /
  `_encode_text` return (unnormalised), i.e. the attentional pooler's query outputs for the image
  and the text tower's states before its appended class token: what CoCa's `text_decoder` reads.

`features` are what `encode_image` / `encode_text` return (unnormalised); padding positions of the
caption are marked by `text_valid`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmssl.errors import UserError
from mmssl.models.text_trim import _text_parts, can_trim, trimmed_length


@dataclass
class TowerTokens:
    features: torch.Tensor   # [B, embed_dim] as the tower's encode_* returns (not normalised)
    tokens: torch.Tensor     # [B, T, width] per-token states


def image_token_width(visual: nn.Module) -> int:
    """Width of `image_tokens(...).tokens` for this image tower."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        return visual.conv1.out_channels
    if isinstance(visual, ModifiedResNet):
        return visual.attnpool.c_proj.in_features
    raise UserError(f"the fusion heads (ITM, captioning) need an open_clip ViT or ModifiedResNet image tower; "
                    f"this model's is {type(visual).__name__}")


def is_coca(model: nn.Module) -> bool:
    """open_clip's CoCa: a model with its own multimodal text decoder."""
    from open_clip.coca_model import CoCa

    return isinstance(model, CoCa)


def image_tokens(visual: nn.Module, images: torch.Tensor) -> TowerTokens:
    """Pooled features and per-token states of `images` [B, 3, H, W] from one pass of the tower.

    `visual` is the image tower, or the whole model (required for a CoCa model: its `_encode_image`)."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    if is_coca(visual):
        features, tokens = visual._encode_image(images, normalize=False)
        return TowerTokens(features, tokens)
    if not isinstance(visual, (VisionTransformer, ModifiedResNet)) and isinstance(getattr(visual, "visual", None),
                                                                                   nn.Module):
        visual = visual.visual          # a whole (non-CoCa) model: its image tower
    if isinstance(visual, VisionTransformer):
        if visual.attn_pool is not None:
            raise UserError("the fusion heads do not support ViT towers with attentional pooling")
        pooled, tokens = visual._pool(visual.transformer(visual._embeds(images)))
        features = pooled @ visual.proj if visual.proj is not None else pooled
        return TowerTokens(features, torch.cat([pooled[:, None], tokens], dim=1))
    if isinstance(visual, ModifiedResNet):
        x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(images)))))
        features = visual.attnpool(x)
        cells = x.flatten(2).transpose(1, 2)                          # [B, h*w, channels]
        first = cells.mean(dim=1, keepdim=True)                       # what the attention pool queries with
        return TowerTokens(features, torch.cat([first, cells], dim=1))
    image_token_width(visual)   # raises the error naming the tower
    raise AssertionError("unreachable")


def text_pad_id(model: nn.Module) -> int:
    from open_clip.hf_model import HFTextEncoder

    text = getattr(model, "text", None)
    return text.config.pad_token_id if isinstance(text, HFTextEncoder) else 0


def text_valid(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """[B, L] True at the caption's real tokens, False at padding."""
    return tokens != text_pad_id(model)


def text_token_width(model: nn.Module) -> int:
    from open_clip.hf_model import HFTextEncoder

    text = getattr(model, "text", None)
    if isinstance(text, HFTextEncoder):
        return text.config.hidden_size
    tower, _, _ = _text_parts(model)
    return tower.token_embedding.embedding_dim


def text_tokens(model: nn.Module, tokens: torch.Tensor) -> TowerTokens:
    """Pooled features (`encode_text`'s) and per-position states [B, L, width] of `tokens` [B, L]."""
    from open_clip.hf_model import HFTextEncoder
    from open_clip.transformer import text_global_pool

    if is_coca(model):
        features, states = model._encode_text(tokens, normalize=False)
        return TowerTokens(features, states)
    text = getattr(model, "text", None)
    if isinstance(text, HFTextEncoder):
        attention = (tokens != text.config.pad_token_id).long()
        out = text.transformer(input_ids=tokens, attention_mask=attention)
        return TowerTokens(text.proj(text.pooler(out, attention)), out.last_hidden_state)
    if not can_trim(model):
        raise UserError("the fusion heads need open_clip's causal text transformer (EOT pooling, no class "
                        "token) or a Hugging Face text tower")
    tower, pool_type, eos_id = _text_parts(model)
    length = trimmed_length(tokens)
    kept = tokens[:, :length]
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(kept).to(cast_dtype) + tower.positional_embedding[:length].to(cast_dtype)
    states = tower.ln_final(tower.transformer(x, attn_mask=tower.attn_mask[:length, :length]))
    features = text_global_pool(states, kept, pool_type, eos_token_id=eos_id)
    projection = tower.text_projection
    if projection is not None:
        features = projection(features) if isinstance(projection, nn.Linear) else features @ projection
    states = F.pad(states, (0, 0, 0, tokens.shape[1] - length))   # padding columns: zeros, masked downstream
    return TowerTokens(features, states)
