"""DeepCluster's clustering sample: the first N images of `data.train`, decoded once, kept as uint8.

The sample is read in shard order (every source of `data.train` in the order given, each shard's
samples in tar order), without shuffling or resampling, and decoded with the model's EVAL
transform (resize + center crop, no augmentation), so every rank and every resume holds the same
images in the same rows. Corrupt or lost samples are skipped (the next readable ones take their
place), as the loaders skip them. Only the PIL part of the transform runs here: rows are the
uint8 pixels [N, 3, H, W] the transform's ToTensor would read, and `mmssl.heads.deepcluster`
normalises them (the transform's mean and std) whenever it feeds them to the tower, at a quarter
of the memory of float pixels (2,048 images of 64 px: 25 MB).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from mmssl.data.samples import CorruptSample, LostSamples, SampleDecoder, shard_samples
from mmssl.data.sources import SourceSpec, resolve_shards
from mmssl.errors import UserError


def read_cluster_sample(source: SourceSpec, transform: Callable, count: int, *, minimum: int = 1,
                        decode_size: Optional[int] = None, allow_remote: bool = False) -> torch.Tensor:
    """[N, 3, H, W] uint8: the first `count` readable images of `source` through `transform`'s PIL
    part (N = count, or every image when the source holds fewer, but at least `minimum`).

    `transform` must end in ToTensor [+ Normalize] (open_clip's transforms do): its pixels are kept
    as uint8 and normalised by the user of the sample (`mmssl.data.image_batch`).
    """
    decoder = SampleDecoder(transform, decode_size, captions=False)
    if not decoder.images.batched:
        raise ValueError("the clustering sample needs a transform ending in ToTensor [+ Normalize]")
    rows = []
    for shard in resolve_shards(source, allow_remote=allow_remote):
        for raw in shard_samples(shard.url, 0, shard.count):
            if isinstance(raw, LostSamples):
                continue
            try:
                rows.append(decoder.guarded(raw, decoder.image, raw))   # uint8 [H, W, 3]
            except CorruptSample:
                continue
            if len(rows) == count:
                break
        if len(rows) == count:
            break
    if len(rows) < minimum:
        raise UserError(f"heads.deepcluster.sample: data.train holds {len(rows)} readable image(s), fewer than "
                        f"the {minimum} clusters of heads.deepcluster.k; add data or lower heads.deepcluster.k")
    return torch.stack(rows).permute(0, 3, 1, 2).contiguous()


def cluster_sample_for(cfg, model) -> torch.Tensor:
    """The clustering sample of an experiment config (`heads.deepcluster.sample` images of
    `data.train`, at least `heads.deepcluster.k`), through `model`'s eval transform."""
    from mmssl.models import image_transform

    size = model.visual.image_size
    size = max(size) if isinstance(size, (tuple, list)) else size
    head = cfg.heads.deepcluster
    return read_cluster_sample(cfg.data.train, image_transform(model, train=False), head.sample, minimum=head.k,
                               decode_size=size, allow_remote=cfg.data.allow_remote)
