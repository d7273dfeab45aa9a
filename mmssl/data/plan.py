"""Who reads which samples in an epoch: the split over ranks and DataLoader workers.

The problem: shards differ in size, ranks x workers rarely divide the shard count, and a rank
that runs out of batches before the others hangs the next all-reduce. webdataset's usual answer
(resample shards + `with_epoch`) never hangs but repeats and drops samples within an epoch.

The choice here, possible because every shard's count is known (manifest / stats): lay the
epoch's shards end to end in a seeded order (the same on every rank) and give each (rank, worker)
"slot" a contiguous range of that virtual sequence, exactly as long as its batches need:

* every rank gets `batches_per_epoch = total // (batch_size * world_size)` batches, split over
  its workers as evenly as possible (worker w gets one more when w < remainder);
* slot ranges are disjoint, so no sample repeats within an epoch; the few samples past the last
  full global batch are left out (a different few each epoch, since the shard order changes);
* a slot opens only the shards its range overlaps and fast-forwards inside the first one, so the
  read amplification is at most one partial shard per slot.

With resampling, each slot instead streams shards drawn with replacement (by sample count) from
every source, picks each sample's source by `train_weights`, and takes the same fixed number of
batches per epoch.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Sequence

from mmssl.data.sources import Shard


@dataclass(frozen=True)
class Split:
    """The fixed shape of an epoch for one run: batch counts per rank and per worker."""

    total_samples: int
    batch_size: int
    world_size: int
    num_workers: int  # logical workers per rank (1 when the DataLoader has none)

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank yields per epoch."""
        return self.total_samples // (self.batch_size * self.world_size)

    def worker_batches(self, worker: int) -> int:
        base, extra = divmod(self.batches_per_epoch, self.num_workers)
        return base + (1 if worker < extra else 0)

    @property
    def max_worker_batches(self) -> int:
        return self.worker_batches(0)

    def slot_range(self, rank: int, worker: int) -> tuple[int, int]:
        """[start, stop) of this slot in the epoch's virtual sample sequence."""
        start = rank * self.batches_per_epoch + sum(self.worker_batches(w) for w in range(worker))
        return start * self.batch_size, (start + self.worker_batches(worker)) * self.batch_size


def epoch_rng(*parts) -> random.Random:
    """A generator seeded by a tuple of parts: identical in every process, independent per tuple."""
    return random.Random(":".join(str(part) for part in parts))


def epoch_shard_order(shards: Sequence[Shard], seed: int, epoch: int) -> list[Shard]:
    order = list(shards)
    epoch_rng("shards", seed, epoch).shuffle(order)
    return order


def slot_segments(
    shards: Sequence[Shard], seed: int, epoch: int, start: int, stop: int
) -> list[tuple[str, int, int]]:
    """(url, first, end) pieces of the epoch's shard order that cover samples [start, stop)."""
    segments = []
    offset = 0
    for shard in epoch_shard_order(shards, seed, epoch):
        low, high = max(start, offset), min(stop, offset + shard.count)
        if low < high:
            segments.append((shard.url, low - offset, high - offset))
        offset += shard.count
        if offset >= stop:
            break
    return segments


def draw_shards(group: Sequence[Shard], rng: random.Random) -> Iterator[str]:
    """Endless shard urls of one source drawn with replacement, each by its sample count."""
    weights = [shard.count for shard in group]
    while True:
        yield rng.choices(group, weights=weights)[0].url
