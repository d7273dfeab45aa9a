"""Streaming image-text data: shard sources, the training loader, the eval loader.

shards (`sources.resolve_shards`) -> raw samples split over ranks and workers -> decode and
transform (corrupt samples skipped and counted) -> tokenised batches. See each module's docstring.
"""
from mmssl.data.sources import Shard, count_tar_samples, resolve_shards, resolve_sources, total_samples

__all__ = ["Shard", "count_tar_samples", "resolve_shards", "resolve_sources", "total_samples"]
