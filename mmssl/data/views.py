"""Two augmented views of each training image, for SimCLR-style objectives (only when asked).

The augmentation is SimCLR's (Chen et al. 2020, appendix A), as SLIP uses it: random resized crop
(scale 0.08-1) to the model's image size, horizontal flip, colour jitter (0.4, 0.4, 0.4, 0.1) with
p=0.8, grayscale with p=0.2, Gaussian blur (kernel ~10% of the image size, sigma 0.1-2) with
p=0.5, then the model's own normalisation.

Determinism: each sample's two views are drawn from a torch generator state seeded by (run seed,
epoch, sample key) alone, so they do not depend on the worker, the batch, or what was decoded
before: a resumed run, which fast-forwards without decoding, draws exactly the same views.
"""
from __future__ import annotations

import zlib

import torch

from mmssl.data.image_batch import BatchedImageTransform


def simclr_augmentation(image_size: int, mean, std):
    """torchvision Compose of SimCLR's augmentation for square `image_size` outputs."""
    from torchvision import transforms as T

    kernel = max(3, int(0.1 * image_size) // 2 * 2 + 1)  # odd, about 10% of the side
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def model_augmentation(model):
    """`simclr_augmentation` sized and normalised for this open_clip model."""
    from open_clip.model import get_model_preprocess_cfg

    cfg = get_model_preprocess_cfg(model)
    size = cfg["size"]
    return simclr_augmentation(max(size) if isinstance(size, (tuple, list)) else size, cfg["mean"], cfg["std"])


class TwoViews:
    """PIL image -> its two views (per sample); `batch` stacks them into [2, B, 3, H, W]."""

    def __init__(self, augmentation, seed: int = 0):
        self.images = BatchedImageTransform(augmentation)
        self.seed = seed

    def sample(self, image, epoch: int, key: str) -> tuple:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(zlib.crc32(f"views:{self.seed}:{epoch}:{key}".encode()))
            return self.images.sample(image), self.images.sample(image)

    def batch(self, pairs: list) -> torch.Tensor:
        first, second = zip(*pairs)
        return torch.stack([self.images.batch(list(first)), self.images.batch(list(second))])
