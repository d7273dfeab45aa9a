"""LiT-style tower locking: frozen parameters simply stop receiving gradients (requires_grad=False).

open_clip's `lock_image_tower(unlocked_groups)` and `lock_text_tower(unlocked_layers)` do the work
for its own towers. Its Hugging Face adapter cannot unlock a number of layers for BERT-family
models (its architecture table lacks the layer names), so that case is handled here: embeddings
and all but the last `unlocked_layers` encoder layers are frozen, and the freshly initialised
projection stays trainable (freezing a random projection would make the tower useless).
"""
from __future__ import annotations

from mmssl.errors import UserError
from mmssl.models.hf_text import is_hf_text_tower


def apply_locking(model, model_cfg) -> None:
    """Freeze what `model_cfg` (lock_image, lock_text and their unlocked counts) asks for."""
    if model_cfg.lock_image:
        if model_cfg.lock_image_unlocked_groups < 0:
            raise UserError("model.lock_image_unlocked_groups must be >= 0")
        model.lock_image_tower(unlocked_groups=model_cfg.lock_image_unlocked_groups)
    if model_cfg.lock_text:
        if model_cfg.lock_text_unlocked_layers < 0:
            raise UserError("model.lock_text_unlocked_layers must be >= 0")
        if is_hf_text_tower(model):
            lock_hf_text_tower(model.text, model_cfg.lock_text_unlocked_layers)
        else:
            model.lock_text_tower(unlocked_layers=model_cfg.lock_text_unlocked_layers)


def lock_hf_text_tower(text_tower, unlocked_layers: int = 0) -> None:
    """Freeze the HF transformer except its last `unlocked_layers` layers; keep the projection trainable."""
    transformer = text_tower.transformer
    for param in transformer.parameters():
        param.requires_grad = False
    if unlocked_layers:
        for layer in _encoder_layers(transformer)[-unlocked_layers:]:
            for param in layer.parameters():
                param.requires_grad = True


def _encoder_layers(transformer):
    """The list of transformer blocks of a Hugging Face encoder (BERT, RoBERTa, MPNet, T5, ...)."""
    encoder = getattr(transformer, "encoder", transformer)
    for attr in ("layer", "layers", "block"):
        layers = getattr(encoder, attr, None)
        if layers is not None:
            return list(layers)
    raise UserError(f"cannot find the layers of {type(transformer).__name__} to unlock; use lock_text_unlocked_layers=0")
