"""PIL image -> normalised tensor, exactly as open_clip preprocesses for the same model."""
from __future__ import annotations


def image_transform(model, train: bool = False):
    """open_clip's transform for the model's image size, mean and std.

    train=True gives open_clip's training augmentation (random resized crop, scale 0.9-1.0);
    train=False resizes the shortest side and center-crops.
    """
    from open_clip.model import get_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**get_model_preprocess_cfg(model)), is_train=train)
