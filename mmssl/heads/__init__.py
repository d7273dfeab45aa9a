"""Auxiliary heads trained next to the contrastive loss: MLM on text, MAE-style inpainting on images.

`build_heads(cfg, model)` returns an `nn.ModuleDict` holding only the heads whose loss weight is
positive: a head with weight 0 is never built, so it adds no parameters, no optimizer state and
no forward pass. Heads are saved under the checkpoint's `heads` dict and never inside the dual
encoder's `model` state dict, so a checkpoint trained with heads loads for eval without them.
"""
from __future__ import annotations

from torch import nn

from mmssl.errors import require
from mmssl.heads.inpaint import InpaintHead
from mmssl.heads.mlm import MLMHead

INPAINT_MODES = ("separate", "shared")


def build_heads(cfg, model: nn.Module) -> nn.ModuleDict:
    """The enabled heads for ExperimentConfig `cfg`, keyed "mlm" / "inpaint"."""
    require(cfg.loss.mlm_weight >= 0, f"loss.mlm_weight must be >= 0, got {cfg.loss.mlm_weight}")
    require(cfg.loss.inpaint_weight >= 0, f"loss.inpaint_weight must be >= 0, got {cfg.loss.inpaint_weight}")
    heads = nn.ModuleDict()
    if cfg.loss.mlm_weight > 0:
        mlm = cfg.heads.mlm
        heads["mlm"] = MLMHead(model, mlm.mask_prob, mlm.replace_mask, mlm.replace_random)
    if cfg.loss.inpaint_weight > 0:
        inpaint = cfg.heads.inpaint
        require(inpaint.mode in INPAINT_MODES,
                f"heads.inpaint.mode must be one of {', '.join(INPAINT_MODES)}, got {inpaint.mode!r}")
        heads["inpaint"] = InpaintHead(model, inpaint.mask_ratio, inpaint.decoder_depth, inpaint.decoder_width,
                                       inpaint.decoder_heads, inpaint.norm_pix_loss)
    return heads


__all__ = ["INPAINT_MODES", "InpaintHead", "MLMHead", "build_heads"]
