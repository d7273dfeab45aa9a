"""Dual encoders: open_clip architectures built from names, JSON configs or mmssl checkpoints
(every way to name one, and the checkpoint reader: `mmssl.models.refs`)."""
from mmssl.models.factory import (
    create_model,
    list_models,
    register_with_open_clip,
    resolve_model_config,
)
from mmssl.models.refs import ModelRef, parse_ref, read_checkpoint
from mmssl.models.transforms import image_transform

__all__ = [
    "create_model",
    "image_transform",
    "list_models",
    "ModelRef",
    "parse_ref",
    "read_checkpoint",
    "register_with_open_clip",
    "resolve_model_config",
]
