"""The evaluation loader: every sample of labelled / captioned shards exactly once, in shard order.

No shuffling, no resampling, no dropped last batch. With workers, shard i goes to worker
i % workers and each worker reads its shards in order, so the sequence is fixed (keys say which
sample is which). Corrupt samples are skipped, logged and counted like in training.
"""
from __future__ import annotations

from typing import Callable, Iterator, NamedTuple, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmssl.data.samples import CorruptSample, LostSamples, SampleDecoder, eval_targets, sample_meta, shard_samples
from mmssl.data.sources import SourceSpec, resolve_shards


class EvalBatch(NamedTuple):
    images: torch.Tensor            # [B, 3, H, W]
    labels: Optional[torch.Tensor]  # [B] int64 from json `label`; None when any sample lacks one
    captions: list                  # per sample, the list of all its captions (json `captions` or .txt)
    keys: list                      # sample keys (str)
    meta: Optional[list] = None     # per sample, its json as a dict ({} without one); None: not read


def _as_is(item):
    return item


class _EvalStream(IterableDataset):
    def __init__(self, shards: list, transform: Callable, batch_size: int, decode_size: Optional[int]):
        self.shards, self.batch_size = shards, batch_size
        self.decoder = SampleDecoder(transform, decode_size)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        pending, corrupt = [], 0
        for shard in self.shards[worker::workers]:
            for raw in shard_samples(shard.url, 0, shard.count):
                if isinstance(raw, LostSamples):
                    corrupt += raw.count
                    continue
                try:
                    pending.append(self._decode(raw, shard.benchmark is not None))
                except CorruptSample:
                    corrupt += 1
                    continue
                if len(pending) == self.batch_size:
                    yield self._collate(pending), corrupt
                    pending, corrupt = [], 0
        if pending or corrupt:
            yield (self._collate(pending) if pending else None), corrupt

    def _decode(self, raw: dict, caption_lines: bool):
        meta = self.decoder.guarded(raw, sample_meta, raw)
        label, captions = self.decoder.guarded(raw, eval_targets, raw, caption_lines, meta)
        return self.decoder.guarded(raw, self.decoder.image, raw), label, captions, raw["__key__"], meta

    def _collate(self, samples: list) -> EvalBatch:
        images, labels, captions, keys, metas = zip(*samples)
        label_tensor = None if any(label is None for label in labels) else torch.tensor(labels)
        return EvalBatch(self.decoder.images.batch(list(images)), label_tensor, list(captions), list(keys),
                         list(metas))


class EvalLoader:
    """Iterable of `EvalBatch` over one pass of the data; `corrupt_count` after (or during) it."""

    def __init__(self, source: SourceSpec, *, transform: Callable, batch_size: int = 256,
                 num_workers: int = 2, decode_size: Optional[int] = None, allow_remote: bool = False,
                 split: Optional[str] = None):
        self.shards = resolve_shards(source, allow_remote=allow_remote, split=split)
        # a CLIP_benchmark split (one source): its class names, templates and type for the eval
        splits = {shard.benchmark for shard in self.shards}
        self.benchmark = splits.pop() if len(splits) == 1 else None
        self.dataset = _EvalStream(self.shards, transform, batch_size, decode_size)
        self.num_workers = min(num_workers, len(self.shards))
        self.corrupt_count = 0

    @property
    def num_samples(self) -> Optional[int]:
        """Samples the shards hold by their manifest/stats (None if unknown), corrupt ones included."""
        counts = [shard.count for shard in self.shards]
        return None if None in counts else sum(counts)

    def __iter__(self) -> Iterator[EvalBatch]:
        self.corrupt_count = 0
        loader = DataLoader(self.dataset, batch_size=None, collate_fn=_as_is, num_workers=self.num_workers)
        for batch, corrupt in loader:
            self.corrupt_count += corrupt
            if batch is not None:
                yield batch


def build_eval_loader(source: SourceSpec, *, transform: Callable, batch_size: int = 256,
                      num_workers: int = 2, decode_size: Optional[int] = None,
                      allow_remote: bool = False, split: Optional[str] = None) -> EvalLoader:
    """An `EvalLoader` over a shard folder / pattern / list or a CLIP_benchmark folder's `split`
    (see `mmssl.data.sources`)."""
    return EvalLoader(source, transform=transform, batch_size=batch_size, num_workers=num_workers,
                      decode_size=decode_size, allow_remote=allow_remote, split=split)
