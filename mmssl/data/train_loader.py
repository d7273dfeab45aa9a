"""The training loader: an endless, deterministic, resumable stream of tokenised image-text batches.

Shape of the stream. Each DataLoader worker runs its own endless loop over epochs; in every
epoch it produces exactly the batches `plan.Split` assigns it (see `mmssl.data.plan` for why
the split cannot hang or repeat samples). torch's DataLoader returns worker results strictly in
turn (batch i comes from worker i % W), so the whole sequence is fixed by (seed, epoch) as long
as every worker yields the same number of items per epoch: a worker with one batch fewer yields
an empty "marker" item in its place, which the main process drops. Workers therefore never
restart between epochs (they are persistent by construction) and epochs do not bleed into each
other.

Position and resume. Every item carries its worker's cursor (epoch, raw samples consumed in
that epoch, batches produced, corrupt samples so far). The main process keeps the cursor of the
last item it handed out per worker plus whose turn is next: that is `state_dict()`. Resuming
rebuilds each worker's epoch stream from (seed, epoch), fast-forwards `raw` samples as bytes
(no decoding), and rotates worker ids so the round-robin continues with the right worker, so a
resumed run yields exactly the batches the uninterrupted one would have.

Corrupt samples are counted in the cursors (`TrainLoader.corrupt_count`), logged by the worker,
and replaced by further samples of the same slot (a second shuffled pass over its range if
needed), so every rank still yields its fixed number of batches.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from itertools import count, islice
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmssl.data import plan
from mmssl.data.samples import CorruptSample, LostSamples, SampleDecoder, segment_samples, shard_samples
from mmssl.data.sources import Shard, SourceSpec, resolve_sources
from mmssl.data.views import TwoViews
from mmssl.errors import UserError, require

STATE_VERSION = 1


class TrainBatch(NamedTuple):
    images: torch.Tensor            # [B, 3, H, W], as the image transform made them
    texts: Optional[torch.Tensor]   # [B, context_length] token ids; None without a tokenizer
    keys: list                      # sample keys (str), for tracing and exact-resume checks
    captions: list                  # the caption (str) each text was tokenised from; None each without captions
    views: Optional[torch.Tensor] = None  # [2, B, 3, H, W] two augmented views per sample, only when asked
    labels: Optional[torch.Tensor] = None  # [B] int64 class labels, only when asked (fine-tuning)


@dataclass
class Cursor:
    """One worker's position: next batch `batches` of `epoch`, after `raw` raw samples of it."""

    epoch: int = 0
    raw: int = 0
    batches: int = 0
    corrupt: int = 0


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when it is initialised, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _as_is(item):
    """DataLoader collate for already-batched items (the default would walk every string list)."""
    return item


class _TrainStream(IterableDataset):
    """What runs inside each DataLoader worker: the epoch loop of one (rank, worker) slot."""

    def __init__(self, loader: "TrainLoader", cursors: list[Cursor], rotation: int):
        self.groups = loader.groups
        self.shards = [shard for group in loader.groups for shard in group]
        self.weights = loader.weights
        self.split = loader.split
        self.rank = loader.rank
        self.seed = loader.seed
        self.resampled = loader.resampled
        self.shuffle_buffer = loader.shuffle_buffer
        views = TwoViews(loader.views, loader.seed) if loader.views is not None else None
        self.decoder = SampleDecoder(loader.transform, loader.decode_size, loader.seed, loader.captions, views,
                                     labels=loader.labels)
        self.tokenizer = CachedTokenizer(loader.tokenizer) if loader.tokenizer is not None else None
        self.cursors = cursors
        self.rotation = rotation

    def __iter__(self):
        info = get_worker_info()
        worker = 0 if info is None else (info.id + self.rotation) % self.split.num_workers
        cursor = dataclasses.replace(self.cursors[worker])
        while True:
            wanted = self.split.worker_batches(worker)
            if cursor.batches < wanted:
                for batch in self._epoch_batches(worker, cursor, wanted):
                    yield batch, worker, dataclasses.replace(cursor)
            if wanted < self.split.max_worker_batches:
                cursor = Cursor(cursor.epoch + 1, 0, 0, cursor.corrupt)
                yield None, worker, dataclasses.replace(cursor)
            else:
                cursor = Cursor(cursor.epoch + 1, 0, 0, cursor.corrupt)

    def _epoch_batches(self, worker: int, cursor: Cursor, wanted: int) -> Iterator[TrainBatch]:
        """Decode and batch this epoch's samples from `cursor` on, updating it in place."""
        stream = islice(self._raw_epoch(worker, cursor.epoch), cursor.raw, None)
        pending, good_in_pass, current_pass = [], 0, None
        batch_size = self.split.batch_size
        for pass_index, raw in stream:
            if pass_index != current_pass:
                if current_pass is not None and good_in_pass == 0:
                    raise UserError(f"no readable samples in the shards of rank {self.rank} worker {worker}")
                current_pass, good_in_pass = pass_index, 0
            cursor.raw += 1
            if isinstance(raw, LostSamples):
                cursor.corrupt += raw.count
                continue
            try:
                pending.append(self.decoder(raw, cursor.epoch))
                good_in_pass += 1
            except CorruptSample:
                cursor.corrupt += 1
                continue
            if len(pending) == batch_size:
                cursor.batches += 1
                yield self._collate(pending)
                pending = []
                if cursor.batches == wanted:
                    return

    def _collate(self, samples: list) -> TrainBatch:
        images, captions, keys, *views = zip(*samples)
        captions, labels = list(captions), None
        if self.decoder.labels:
            captions, labels = [None] * len(captions), torch.tensor(captions, dtype=torch.long)
        texts = self.tokenizer(captions) if self.tokenizer is not None and self.decoder.captions else None
        views = self.decoder.views.batch(list(views[0])) if views else None
        return TrainBatch(self.decoder.images.batch(list(images)), texts, list(keys), captions, views, labels)

    def _raw_epoch(self, worker: int, epoch: int) -> Iterator[tuple[int, dict]]:
        """(pass, raw sample) for this slot's epoch, shuffled; endless (later passes refill corrupt ones)."""
        if self.resampled:
            mixed = self._mixed_sources(plan.epoch_rng("resample", self.seed, epoch, self.rank, worker))
            yield from ((0, raw) for raw in self._shuffled(mixed, epoch, worker, 0))
            return
        start, stop = self.split.slot_range(self.rank, worker)
        segments = plan.slot_segments(self.shards, self.seed, epoch, start, stop)
        for pass_index in count():
            empty = True
            for raw in self._shuffled(segment_samples(segments), epoch, worker, pass_index):
                empty = False
                yield pass_index, raw
            if empty:
                raise UserError(f"the shards of rank {self.rank} worker {worker} hold no samples")

    def _shuffled(self, raw: Iterator[dict], epoch: int, worker: int, pass_index: int) -> Iterator[dict]:
        if self.shuffle_buffer <= 1:
            return raw
        rng = plan.epoch_rng("samples", self.seed, epoch, self.rank, worker, pass_index)
        return wds_shuffle(raw, self.shuffle_buffer, rng)

    def _mixed_sources(self, rng) -> Iterator[dict]:
        """Endless samples: each one's source drawn by weight, from that source's resampled shards."""
        streams = [self._endless_source(group, rng) for group in self.groups]
        weights = self.weights or [sum(shard.count for shard in group) for group in self.groups]
        sources = range(len(streams))
        while True:
            yield next(streams[rng.choices(sources, weights=weights)[0]])

    @staticmethod
    def _endless_source(group: Sequence[Shard], rng) -> Iterator[dict]:
        empty_draws = 0
        counts = {shard.url: shard.count for shard in group}
        for url in plan.draw_shards(group, rng):
            produced = False
            for raw in shard_samples(url, 0, counts[url]):
                produced = produced or not isinstance(raw, LostSamples)
                yield raw
            empty_draws = 0 if produced else empty_draws + 1
            if empty_draws > 100:
                raise UserError(f"resampled shards yield no samples (last tried: {url})")


class CachedTokenizer:
    """A tokenizer that remembers caption -> token row, so repeated captions (every epoch of a
    small dataset, templated captions) are tokenised once. Rows do not depend on the batch."""

    def __init__(self, tokenizer: Callable, capacity: int = 100_000):
        self.tokenizer, self.capacity, self.rows = tokenizer, capacity, {}

    def __call__(self, captions: list) -> torch.Tensor:
        known = self.rows
        missing = [caption for caption in dict.fromkeys(captions) if caption not in self.rows]
        if missing:
            fresh = dict(zip(missing, self.tokenizer(missing).clone()))
            room = self.capacity - len(self.rows)
            self.rows.update(list(fresh.items())[:max(room, 0)])
            known = {**self.rows, **fresh} if room < len(missing) else self.rows
        return torch.stack([known[caption] for caption in captions])


def wds_shuffle(raw: Iterator[dict], buffer: int, rng) -> Iterator[dict]:
    """webdataset's sample shuffle buffer with our seeded generator (filled fully before it yields)."""
    return wds.shuffle(bufsize=buffer, initial=buffer, rng=rng)(iter(raw))


class TrainLoader:
    """Endless iterable of `TrainBatch`, with `state_dict()` / `load_state_dict()` for exact resume.

    `batch_size` is per rank. Iterate it as long as training runs; `epoch`, `step` and
    `corrupt_count` describe the position reached by the batches handed out so far.
    """

    def __init__(
        self,
        source: SourceSpec,
        *,
        transform: Callable,
        tokenizer: Optional[Callable] = None,
        batch_size: int,
        seed: int = 0,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        weights: Optional[Sequence[float]] = None,
        decode_size: Optional[int] = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        prefetch_factor: int = 4,
        pin_memory: bool = False,
        allow_remote: bool = False,
        captions: bool = True,
        views: Optional[Callable] = None,
        labels: bool = False,
    ):
        require(batch_size >= 1, f"batch size must be positive, got {batch_size}")
        self.groups = resolve_sources(source, need_counts=True, allow_remote=allow_remote)
        if weights is not None:
            require(
                len(weights) == len(self.groups) and all(w >= 0 for w in weights) and sum(weights) > 0,
                f"data.train_weights needs one non-negative weight per source ({len(self.groups)}), got {list(weights)}",
            )
        self.weights = list(weights) if weights is not None else None
        self.resampled = resampled or weights is not None
        if (rank is None) != (world_size is None):
            raise ValueError("pass both rank and world_size, or neither")
        self.rank, self.world_size = (rank, world_size) if rank is not None else distributed_rank_world()
        total = sum(shard.count for group in self.groups for shard in group)
        self.split = plan.Split(total, batch_size, self.world_size, max(1, num_workers))
        require(
            self.split.batches_per_epoch >= 1,
            f"{total} training samples are fewer than one global batch ({batch_size} x {self.world_size} ranks)",
        )
        self.transform, self.tokenizer, self.decode_size = transform, tokenizer, decode_size
        self.captions, self.views = captions, views  # views: a PIL augmentation drawn twice per sample
        self.labels = labels                         # class labels instead of captions (fine-tuning)
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory
        self._cursors = [Cursor() for _ in range(self.split.num_workers)]
        self._next_worker = 0
        self.step = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.split.batches_per_epoch

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        return self.step // self.split.batches_per_epoch

    @property
    def corrupt_count(self) -> int:
        """Corrupt samples skipped so far by this rank (cumulative, survives resume)."""
        return sum(cursor.corrupt for cursor in self._cursors)

    def __iter__(self) -> Iterator[TrainBatch]:
        dataset = _TrainStream(self, [dataclasses.replace(c) for c in self._cursors], self._next_worker)
        workers = {}
        if self.num_workers > 0:
            workers = dict(persistent_workers=True, prefetch_factor=self.prefetch_factor)
        # its own generator: a DataLoader iterator otherwise draws its base seed from the global RNG,
        # which the objective's random masks also use, and a resumed run would draw them one step off
        loader = DataLoader(
            dataset, batch_size=None, collate_fn=_as_is, num_workers=self.num_workers,
            pin_memory=self.pin_memory, generator=torch.Generator().manual_seed(0), **workers,
        )
        for batch, worker, cursor in loader:
            self._cursors[worker] = cursor
            self._next_worker = (worker + 1) % self.split.num_workers
            if batch is not None:
                self.step += 1
                yield batch

    def state_dict(self) -> dict:
        """The position after the last batch handed out (save it with the checkpoint)."""
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "next_worker": self._next_worker,
            "cursors": [dataclasses.asdict(cursor) for cursor in self._cursors],
            "run": self._run_identity(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the data, seed, batch size, ranks and workers must match."""
        saved, now = state.get("run", {}), self._run_identity()
        for key in now:
            if saved.get(key) != now[key]:
                raise UserError(
                    f"cannot resume the data position: {key} was {saved.get(key)!r}, now {now[key]!r}"
                )
        self.step = int(state["step"])
        self._next_worker = int(state["next_worker"])
        self._cursors = [Cursor(**cursor) for cursor in state["cursors"]]

    def _run_identity(self) -> dict:
        return {
            "total_samples": self.split.total_samples,
            "shards": sum(len(group) for group in self.groups),
            "batch_size": self.split.batch_size,
            "world_size": self.world_size,
            "workers": self.split.num_workers,
            "seed": self.seed,
            "resampled": self.resampled,
            "weights": self.weights,
            "shuffle_buffer": self.shuffle_buffer,
            **({"views": True} if self.views is not None else {}),
            **({"labels": True} if self.labels else {}),
        }


def build_train_loader(
    data_config,
    *,
    transform: Callable,
    tokenizer: Optional[Callable],
    batch_size: int,
    seed: int = 0,
    decode_size: Optional[int] = None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    captions: bool = True,
    views: Optional[Callable] = None,
    labels: bool = False,
) -> TrainLoader:
    """A `TrainLoader` from a `DataConfig` (train, train_weights, resampled, shuffle_buffer, workers).

    `captions=False` for image-only objectives; `views` (an augmentation) when an objective
    contrasts two views of each image (`mmssl.data.views`); `labels=True` yields class labels in
    `TrainBatch.labels` instead of captions (fine-tuning)."""
    if not data_config.train:
        raise UserError("no training data: set data.train (a shard folder, brace pattern or list)")
    return TrainLoader(
        data_config.train,
        transform=transform,
        tokenizer=tokenizer,
        batch_size=batch_size,
        seed=seed,
        num_workers=data_config.workers,
        shuffle_buffer=data_config.shuffle_buffer,
        resampled=data_config.resampled,
        weights=data_config.train_weights,
        allow_remote=data_config.allow_remote,
        decode_size=decode_size,
        rank=rank,
        world_size=world_size,
        captions=captions,
        views=views,
        labels=labels,
    )
