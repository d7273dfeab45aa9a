"""Streaming image-text data: shard sources, the training loader, the eval loader.

shards (`sources.resolve_shards`) -> raw samples split over ranks and workers (`plan`) -> decode
and transform, corrupt samples skipped and counted (`samples`) -> tokenised batches
(`train_loader.TrainLoader`, `eval_loader.EvalLoader`). Each module's docstring says why.
"""
from mmssl.data.eval_loader import EvalBatch, EvalLoader, build_eval_loader
from mmssl.data.sources import Shard, count_tar_samples, resolve_shards, resolve_sources, total_samples
from mmssl.data.train_loader import TrainBatch, TrainLoader, build_train_loader

__all__ = [
    "EvalBatch", "EvalLoader", "Shard", "TrainBatch", "TrainLoader", "build_eval_loader",
    "build_train_loader", "count_tar_samples", "resolve_shards", "resolve_sources", "total_samples",
]
