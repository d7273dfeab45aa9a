"""Running a model's image transform with its tensor tail once per batch instead of per sample.

open_clip's preprocessing ends with ToTensor + Normalize; per 64 px sample those two cost more
than the JPEG decode. When the transform is a torchvision Compose ending that way, workers run
the PIL part per sample, keep uint8 pixels, and convert + normalise the stacked batch with the
same float operations (so the result is bitwise the same). Any other transform runs as given.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch


class BatchedImageTransform:
    def __init__(self, transform: Callable):
        self.transform = transform
        self.per_sample, self.normalize = _split(transform)

    @property
    def batched(self) -> bool:
        return self.per_sample is not None

    def sample(self, image):
        """One decoded PIL image -> uint8 HWC tensor (batched mode) or the transform's output."""
        if self.per_sample is None:
            return self.transform(image)
        image = self.per_sample(image)
        if image.mode != "RGB":
            image = image.convert("RGB")
        return torch.from_numpy(np.array(image))

    def batch(self, images: list) -> torch.Tensor:
        """Per-sample outputs -> the [B, 3, H, W] float batch the full transform would give."""
        stacked = torch.stack(images)
        if self.per_sample is None:
            return stacked
        pixels = stacked.permute(0, 3, 1, 2).contiguous().to(torch.get_default_dtype()).div(255)
        if self.normalize is not None:
            mean = torch.as_tensor(self.normalize.mean, dtype=pixels.dtype).view(1, -1, 1, 1)
            std = torch.as_tensor(self.normalize.std, dtype=pixels.dtype).view(1, -1, 1, 1)
            pixels.sub_(mean).div_(std)
        return pixels


def _split(transform) -> tuple[Optional[Callable], Optional[object]]:
    """(PIL part, Normalize or None) when the transform ends in ToTensor [+ Normalize], else (None, None)."""
    from torchvision import transforms as T

    if not isinstance(transform, T.Compose):
        return None, None
    steps = list(transform.transforms)
    tensor_at = next((i for i, step in enumerate(steps) if isinstance(step, T.ToTensor)), None)
    if tensor_at is None:
        return None, None
    tail = steps[tensor_at + 1:]
    if len(tail) > 1 or (tail and not isinstance(tail[0], T.Normalize)):
        return None, None
    return T.Compose(steps[:tensor_at]), (tail[0] if tail else None)
