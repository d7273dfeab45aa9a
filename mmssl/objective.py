"""The training objective: a contrastive loss plus weighted auxiliary heads, as named terms.

    loss = contrastive_loss + mlm_weight * mlm_loss + inpaint_weight * inpaint_loss

`Objective` is one module holding the dual encoder (`.model`), the enabled heads (`.heads`) and
the contrastive loss (CLIP's InfoNCE or SigLIP's sigmoid loss, `loss.kind`). Its forward returns
every term unweighted plus the weighted total under "loss", so the training loop can log each one
and back-propagate the total. Optimising `objective.parameters()` covers model and heads; a head
with weight 0 is never built, so it adds nothing (no parameters, no forward pass, no FLOPs).

Inpainting modes: `separate` runs the contrastive branch on the full image and the masked image
through its own encoder pass; `shared` (FLIP) encodes only the visible patches once and feeds that
to both the contrastive loss and the decoder. In shared mode the last
`heads.inpaint.unmasked_tune_steps` steps see full images (FLIP's unmasked tuning), where there is
nothing to reconstruct, so the inpainting term is absent from those steps.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmssl.errors import UserError, require
from mmssl.heads import build_heads
from mmssl.heads.vit_tokens import encode_visible
from mmssl.losses import ClipLoss, SigLipLoss
from mmssl.models.text_trim import encode_text

LOSS_KINDS = ("clip", "siglip")
TERM_WEIGHTS = {"mlm_loss": "mlm_weight", "inpaint_loss": "inpaint_weight"}


def build_contrastive_loss(loss_cfg, rank: int = 0, world_size: int = 1) -> nn.Module:
    """ClipLoss or SigLipLoss for the `loss` config section."""
    require(loss_cfg.kind in LOSS_KINDS, f"loss.kind must be one of {', '.join(LOSS_KINDS)}, got {loss_cfg.kind!r}")
    if loss_cfg.kind == "siglip":
        return SigLipLoss(cache_labels=True, rank=rank, world_size=world_size)
    return ClipLoss(local_loss=loss_cfg.local_loss, gather_with_grad=loss_cfg.gather_with_grad,
                    cache_labels=True, rank=rank, world_size=world_size)


class Objective(nn.Module):
    """Dual encoder + heads + contrastive loss; `forward(images, texts, step)` -> dict of terms."""

    def __init__(self, model: nn.Module, cfg, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.model = model
        self.heads = build_heads(cfg, model)
        self.contrastive = build_contrastive_loss(cfg.loss, rank, world_size)
        self.weights = {term: getattr(cfg.loss, field) for term, field in TERM_WEIGHTS.items()}
        self.siglip = cfg.loss.kind == "siglip"
        if self.siglip and getattr(model, "logit_bias", None) is None:
            raise ValueError("loss.kind=siglip needs a model with logit_bias: create_model(..., siglip=True)")
        self.shared_masking = "inpaint" in self.heads and cfg.heads.inpaint.mode == "shared"
        if self.shared_masking and cfg.model.patch_dropout > 0:
            raise UserError("heads.inpaint.mode=shared already drops the masked patches from the contrastive "
                            "branch; set model.patch_dropout=0")
        tune_steps = cfg.heads.inpaint.unmasked_tune_steps
        require(tune_steps >= 0, f"heads.inpaint.unmasked_tune_steps must be >= 0, got {tune_steps}")
        self.unmasked_from_step = cfg.train.steps - tune_steps

    def masks_images(self, step: Optional[int]) -> bool:
        """Whether the contrastive branch sees only visible patches at this (0-based) step."""
        return self.shared_masking and (step is None or step < self.unmasked_from_step)

    def encode(self, images: torch.Tensor, texts: torch.Tensor, step: Optional[int] = None) -> dict:
        """open_clip's output dict for the contrastive loss; in shared mode also the visible patches.

        Captions are encoded without their padding where that is exact (`mmssl.models.text_trim`).
        """
        outputs = {"text_features": encode_text(self.model, texts, normalize=True),
                   "logit_scale": self.model.logit_scale.exp()}
        if not self.masks_images(step):
            outputs["image_features"] = self.model.encode_image(images, normalize=True)
        else:
            head = self.heads["inpaint"]
            mask = head.sample_mask(self.model, images)
            visible = encode_visible(self.model.visual, images, mask.keep)
            outputs.update(image_features=F.normalize(visible.features, dim=-1), visible=visible, patch_mask=mask)
        if self.siglip:
            outputs["logit_bias"] = self.model.logit_bias
        return outputs

    def contrastive_loss(self, outputs: dict) -> torch.Tensor:
        args = [outputs["image_features"].float(), outputs["text_features"].float(), outputs["logit_scale"].float()]
        if self.siglip:
            args.append(outputs["logit_bias"].float())
        return self.contrastive(*args)

    def aux_terms(self, images: torch.Tensor, texts: torch.Tensor, outputs: dict) -> dict:
        """Unweighted auxiliary losses of the enabled heads, e.g. {"mlm_loss": ..., "inpaint_loss": ...}."""
        terms = {}
        if "mlm" in self.heads:
            terms["mlm_loss"] = self.heads["mlm"](self.model, texts)
        if "inpaint" in self.heads:
            head = self.heads["inpaint"]
            if "patch_mask" in outputs:
                terms["inpaint_loss"] = head.reconstruction_loss(images, outputs["visible"], outputs["patch_mask"])
            elif not self.shared_masking:
                terms["inpaint_loss"] = head(self.model, images)
        return terms

    def forward(self, images: torch.Tensor, texts: torch.Tensor, step: Optional[int] = None) -> dict:
        outputs = self.encode(images, texts, step)
        terms = {"contrastive_loss": self.contrastive_loss(outputs)}
        terms.update(self.aux_terms(images, texts, outputs))
        terms["loss"] = terms["contrastive_loss"] + sum(
            self.weights[name] * terms[name] for name in TERM_WEIGHTS if name in terms)
        return terms

    def heads_state_dict(self) -> dict:
        """The checkpoint's `heads` entry: head name -> state dict (empty when no head is on)."""
        return {name: head.state_dict() for name, head in self.heads.items()}

    def load_heads_state_dict(self, state: dict) -> None:
        """Restore the enabled heads from a checkpoint's `heads`; heads absent there keep their init."""
        for name, head in self.heads.items():
            if name in state:
                head.load_state_dict(state[name])
