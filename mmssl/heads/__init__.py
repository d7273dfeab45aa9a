"""Auxiliary heads trained next to the contrastive loss: MLM on text, MAE-style inpainting on images.

Each head is built by the objective (`mmssl.objective.TERMS`) only when its loss weight is
positive, from its own `heads.<name>` config section: a head with weight 0 adds no parameters, no
optimizer state and no forward pass. Heads are saved under the checkpoint's `heads` dict and never
inside the dual encoder's `model` state dict, so a checkpoint trained with heads loads for eval
without them.
"""
from mmssl.heads.inpaint import InpaintHead
from mmssl.heads.mlm import MLMHead

__all__ = ["InpaintHead", "MLMHead"]
