"""mmssl: multimodal (image-text) self-supervised pretraining."""
from mmssl.errors import UserError

__all__ = ["create_model", "UserError"]


def create_model(config_or_name, **overrides):
    """Build dual encoders; see `mmssl.models.factory.create_model`. Imported lazily (torch is heavy)."""
    from mmssl.models.factory import create_model as _create_model

    return _create_model(config_or_name, **overrides)
