"""One process per device, started by torchrun: read its environment, join the process group.

torchrun exports RANK / WORLD_SIZE / LOCAL_RANK; without them we are a single process. gloo is the
CPU backend, NCCL the GPU one. Only rank 0 writes checkpoints and logs (`is_main`).
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mmssl.train.policy import default_device


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistEnv:
    """Join the torchrun process group if there is one; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = default_device(local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown(env: DistEnv, together: bool = True) -> None:
    """Leave the group; `together` (a run that finished) waits for every rank first: a rank that
    destroyed the group while a peer's last send was in flight aborted that peer under gloo
    ("terminate called without an active exception"). A failing rank leaves at once."""
    if env.is_distributed and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def gather_objects(env: DistEnv, obj) -> list:
    """Every rank's `obj` (tensors and plain data), indexed by rank; `[obj]` in a single process.

    Objects travel as `torch.save` bytes: all_gather_object's own pickling of tensors does not
    round-trip torch's RNG state tensors.
    """
    if not env.is_distributed:
        return [obj]
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payloads = [None] * env.world_size
    dist.all_gather_object(payloads, buffer.getvalue())
    return [torch.load(io.BytesIO(payload), weights_only=True) for payload in payloads]


def broadcast_object(env: DistEnv, obj):
    """Rank 0's `obj` on every rank (e.g. a flag deciding to stop)."""
    if not env.is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
