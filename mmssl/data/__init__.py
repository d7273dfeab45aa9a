"""Streaming image-text data: shard sources, the training loader, the eval loader.

shards (`sources.resolve_shards`) -> raw samples split over ranks and workers (`plan`) -> decode
and transform, corrupt samples skipped and counted (`samples`) -> tokenised batches
(`train_loader.TrainLoader`, `eval_loader.EvalLoader`). Each module's docstring says why.

The names below load on first use, so importing a light leaf module (`mmssl.data.urls`,
`mmssl.data.image_guard`) from the command-line parser does not load torch.
"""
from mmssl.lazy import lazy_names

_HOMES = {
    "EvalBatch": "eval_loader", "EvalLoader": "eval_loader", "build_eval_loader": "eval_loader",
    "Shard": "sources", "count_tar_samples": "sources", "resolve_shards": "sources",
    "resolve_sources": "sources", "total_samples": "sources",
    "TrainBatch": "train_loader", "TrainLoader": "train_loader", "build_train_loader": "train_loader",
}

__all__ = sorted(_HOMES)

__getattr__ = lazy_names(__name__, _HOMES, globals())
