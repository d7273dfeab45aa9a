"""Dual encoders: open_clip architectures built from names, JSON configs or mmssl checkpoints."""
from mmssl.models.factory import (
    create_model,
    list_models,
    read_checkpoint,
    register_with_open_clip,
    resolve_model_config,
)
from mmssl.models.transforms import image_transform

__all__ = [
    "create_model",
    "image_transform",
    "list_models",
    "read_checkpoint",
    "register_with_open_clip",
    "resolve_model_config",
]
