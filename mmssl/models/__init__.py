"""Dual encoders: open_clip architectures built from names, JSON configs or mmssl checkpoints
(every way to name one, and the checkpoint reader: `mmssl.models.refs`).

The names below load on first use, so light callers (`mmssl.models.refs` from the quickstart, which
must not load torch before it sets OMP_WAIT_POLICY) do not pull in torch and open_clip.
"""
from mmssl.lazy import lazy_names

_HOMES = {
    "create_model": "factory", "list_models": "factory", "register_with_open_clip": "factory",
    "resolve_model_config": "factory",
    "ModelRef": "refs", "parse_ref": "refs", "read_checkpoint": "refs",
    "image_transform": "transforms",
}

__all__ = sorted(_HOMES)

__getattr__ = lazy_names(__name__, _HOMES, globals())
