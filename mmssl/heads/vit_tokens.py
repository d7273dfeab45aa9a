"""open_clip's VisionTransformer forward, run on a subset of patch tokens.

Why: MAE-style inpainting and FLIP-style masking both encode only the visible patches. open_clip's
`VisionTransformer.forward` has no hook for choosing which patches go in (its PatchDropout picks at
random), so this module reproduces that forward step by step - conv1 patchify, class token,
positional embedding, keep the chosen patches, ln_pre, transformer, ln_post / pool / proj - and is
the one place that depends on those internals. With every patch kept it equals `visual(images)`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmssl.errors import UserError


@dataclass
class VisibleEncoding:
    features: torch.Tensor   # [B, embed_dim] pooled and projected, as encode_image returns
    tokens: torch.Tensor     # [B, 1 + K, width] final states (after ln_post unless it follows pooling): class token, kept patches


def require_vit(visual: nn.Module, what: str) -> None:
    """A clear config error unless `visual` is an open_clip VisionTransformer this module can run."""
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise UserError(f"{what} needs a ViT image tower; this model's image tower is {type(visual).__name__}")
    if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg"):
        raise UserError(f"{what} needs a ViT image tower with 'tok' or 'avg' pooling (no attentional pooling)")


def patch_size(visual: nn.Module) -> int:
    return visual.patch_size[0]


def num_patches(visual: nn.Module) -> int:
    return visual.grid_size[0] * visual.grid_size[1]


def encode_visible(visual: nn.Module, images: torch.Tensor, keep: torch.Tensor) -> VisibleEncoding:
    """Encode `images` [B, 3, H, W] from the patches whose indices are in `keep` [B, K]."""
    x = visual.conv1(images)                             # [B, width, gh, gw]
    x = x.flatten(2).transpose(1, 2)                     # [B, N, width], row-major patch order
    pos = visual.positional_embedding.to(x.dtype)
    x = x + pos[1:]
    x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))
    cls = (visual.class_embedding.to(x.dtype) + pos[0]).expand(x.shape[0], 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1))
    x = visual.transformer(x)
    # open_clip's pooling: 'tok' or 'avg', ln_post on every token or only on the pooled one
    if not visual.final_ln_after_pool:
        x = visual.ln_post(x)
    pooled = x[:, 1:].mean(dim=1) if visual.pool_type == "avg" else x[:, 0]
    if visual.final_ln_after_pool:
        pooled = visual.ln_post(pooled)
    features = pooled @ visual.proj if visual.proj is not None else pooled
    return VisibleEncoding(features=features, tokens=x)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, N, patch*patch*3] pixels per patch, in conv1's row-major patch order."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def pooled_output(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The image tower's pooled output before its projection: [B, width] for an open_clip ViT
    (its own forward up to `proj`, patch dropout included), the tower's output for any other tower."""
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer):
        return visual(images)
    pooled, _ = visual._pool(visual.transformer(visual._embeds(images)))
    return pooled


def pooled_width(visual: nn.Module, embed_dim: int) -> int:
    """Width of `pooled_output`: the ViT's pooled width, else the model's embedding size."""
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        return visual.proj.shape[0] if visual.proj is not None else embed_dim
    return embed_dim
