"""Momentum towers and their queues of keys (MoCo, He et al. 2020; ALBEF, Li et al. 2021).

A momentum copy of the dual encoder, never trained by gradients, follows the online towers as
an exponential moving average (`update`, once at the start of every step: theta_m <- m * theta_m
+ (1 - m) * theta). Its normalised features of a batch are that batch's keys; after the step they
join FIFO queues (`enqueue`), which later steps use as extra negatives, so a small batch still
meets thousands of them. The queues, their write position and fill count are buffers, so they
live in the checkpoint (under `heads`) and a resumed run continues bitwise.

Any queue size works with any global batch: writes wrap around, and a batch larger than the
queue keeps its last `queue_size` keys. Until the queue is full only its filled rows are read
(`negatives`); keys enter it only after the step that made them, so a sample never meets its
own key as a negative in that step. Under torchrun the caller gathers every rank's keys before
`enqueue`, so all ranks hold the same queue.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from mmssl.models.text_trim import encode_text


DEFAULT_MOMENTUM = {"clip": 0.995, "moco": 0.999}     # ALBEF's and MoCo's
MOCO_QUEUE_SIZE = 65536                               # MoCo's


def momentum_of(loss_cfg) -> float:
    """`loss.momentum`, or the kind's default when it is 0."""
    return loss_cfg.momentum or DEFAULT_MOMENTUM.get(loss_cfg.kind, DEFAULT_MOMENTUM["clip"])


class MomentumTowers(nn.Module):
    """`model` (the dual encoder, or any module whose parameters the keys come from) copied and
    followed by EMA, with an image-key queue and (`text=True`) a text-key queue."""

    def __init__(self, model: nn.Module, queue_size: int, momentum: float, embed_dim: int, text: bool = True):
        super().__init__()
        if queue_size < 1 or not 0.0 <= momentum < 1.0:
            raise ValueError("queue_size must be >= 1 and momentum in [0, 1)")
        self.momentum = momentum
        self.model = copy.deepcopy(model)
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.register_buffer("image_queue", torch.zeros(queue_size, embed_dim))
        self.register_buffer("text_queue", torch.zeros(queue_size if text else 0, embed_dim))
        self.register_buffer("position", torch.zeros((), dtype=torch.long))   # next row to write
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))     # rows holding keys

    @property
    def queue_size(self) -> int:
        return self.image_queue.shape[0]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """theta_m <- m * theta_m + (1 - m) * theta for every parameter; buffers (norm statistics) copied."""
        online = dict(model.named_parameters())
        for name, param in self.model.named_parameters():
            param.mul_(self.momentum).add_(online[name].detach(), alpha=1.0 - self.momentum)
        online_buffers = dict(model.named_buffers())
        for name, buffer in self.model.named_buffers():
            buffer.copy_(online_buffers[name])

    @torch.no_grad()
    def keys(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised (image keys, text keys) of a batch from the momentum towers."""
        return self.model.encode_image(images, normalize=True), encode_text(self.model, texts, normalize=True)

    def negatives(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled rows of (image queue, text queue); the text queue is empty when text=False."""
        filled = int(self.filled)
        return self.image_queue[:filled], self.text_queue[:filled]

    @torch.no_grad()
    def enqueue(self, image_keys: torch.Tensor, text_keys: torch.Tensor | None = None) -> None:
        """Write a (global) batch of keys at the write position, wrapping around."""
        size, rows = self.queue_size, image_keys.shape[0]
        start = int(self.position)
        if rows > size:                       # only the newest `size` keys can stay
            start = (start + rows - size) % size
            image_keys, rows = image_keys[-size:], size
            text_keys = None if text_keys is None else text_keys[-size:]
        slots = (start + torch.arange(rows, device=self.image_queue.device)) % size
        self.image_queue[slots] = image_keys.to(self.image_queue.dtype)
        if self.text_queue.shape[0]:
            self.text_queue[slots] = text_keys.to(self.text_queue.dtype)
        self.position.fill_((start + rows) % size)
        self.filled.fill_(min(size, int(self.filled) + rows))
