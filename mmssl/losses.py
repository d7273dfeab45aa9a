"""Contrastive objectives with open_clip's API and numbers: CLIP's InfoNCE and SigLIP's sigmoid loss.

Both take features straight from the towers and a `logit_scale` that is already exponentiated
(the model holds it in log space, initialised to log(1/0.07); `clamp_logit_scale` keeps it at or
below log(100) after each optimiser step). Across processes the features are all-gathered so the
loss sees the global batch; `gather_with_grad` routes gradients back to the rank that produced
each feature (otherwise only the local slice gets gradients, as in open_clip).

`contrastive_step_with_accumulation` keeps the contrastive batch exact while the forward/backward
runs in micro-batches (GradCache): the loss needs every pair in the batch, but its gradient only
flows through the features, so features are computed first without a graph, the loss gradient is
taken with respect to them, and each micro-batch is then re-run with a graph and back-propagated
with its slice of that gradient.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

INIT_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature, in log space
MAX_LOGIT_SCALE = 100.0                 # CLIP clamps exp(logit_scale) here


def clamp_logit_scale(model: nn.Module, max_scale: float = MAX_LOGIT_SCALE) -> None:
    """Keep exp(logit_scale) in [1, max_scale]; call after every optimiser step, as CLIP does."""
    module = getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module
    with torch.no_grad():
        module.logit_scale.clamp_(0, math.log(max_scale))


def gather_features(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    local_loss: bool = False,
    gather_with_grad: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of features, concatenated in rank order.

    With `gather_with_grad`, autograd's all_gather sends each rank's gradient contributions back to
    the owner (summed). Without it, the gathered copies are constants; for the full (non-local) loss
    the local slice is swapped back in so the local features still receive their gradient.
    """
    import torch.distributed as dist

    if gather_with_grad:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(image_features), dim=0), torch.cat(all_gather(text_features), dim=0)
    images = [torch.empty_like(image_features) for _ in range(world_size)]
    texts = [torch.empty_like(text_features) for _ in range(world_size)]
    dist.all_gather(images, image_features.detach().contiguous())
    dist.all_gather(texts, text_features.detach().contiguous())
    if not local_loss:
        images[rank], texts[rank] = image_features, text_features
    return torch.cat(images, dim=0), torch.cat(texts, dim=0)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE: cross-entropy over image->text and text->image similarities, averaged.

    `local_loss=True` scores only this rank's rows against the global batch (memory O(n * N)
    instead of O(N^2)); its mean over ranks equals the full loss. `cache_labels` reuses the target
    index tensor while the batch size stays the same.
    """

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self._labels: dict = {}

    def logits(self, image_features, text_features, logit_scale):
        """(logits_per_image, logits_per_text) as open_clip defines them for these settings."""
        if self.world_size == 1:
            per_image = logit_scale * image_features @ text_features.T
            return per_image, per_image.T
        all_images, all_texts = gather_features(
            image_features, text_features, self.local_loss, self.gather_with_grad, self.rank, self.world_size
        )
        if self.local_loss:
            return logit_scale * image_features @ all_texts.T, logit_scale * text_features @ all_images.T
        per_image = logit_scale * all_images @ all_texts.T
        return per_image, per_image.T

    def targets(self, num_rows: int, device) -> torch.Tensor:
        """Index of each row's positive column: its own position in the global batch."""
        key = (num_rows, device)
        if key in self._labels:
            return self._labels[key]
        offset = num_rows * self.rank if (self.local_loss and self.world_size > 1) else 0
        labels = torch.arange(offset, offset + num_rows, device=device)
        if self.cache_labels:
            self._labels = {key: labels}
        return labels

    def forward(self, image_features, text_features, logit_scale):
        per_image, per_text = self.logits(image_features, text_features, logit_scale)
        labels = self.targets(per_image.shape[0], per_image.device)
        return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


class SigLipLoss(nn.Module):
    """Sigmoid loss: every image-text pair is a binary match/non-match decision.

    loss = -sum_{i, j} log sigmoid(z_ij * (scale * <img_i, txt_j> + bias)) / n_local, z = +1 on the
    matching pair and -1 elsewhere, summed over this rank's images and all texts of the global batch.
    open_clip passes text features around a ring; gathering them with gradient gives the same
    values and gradients with one collective.
    """

    def __init__(self, cache_labels=False, rank=0, world_size=1):
        super().__init__()
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self._signs: dict = {}

    def signs(self, num_rows: int, num_cols: int, device, dtype) -> torch.Tensor:
        """+1 where image i meets its own caption (column rank * n + i), -1 elsewhere."""
        key = (num_rows, num_cols, device, dtype)
        if key in self._signs:
            return self._signs[key]
        signs = -torch.ones(num_rows, num_cols, device=device, dtype=dtype)
        rows = torch.arange(num_rows, device=device)
        signs[rows, rows + num_rows * self.rank] = 1.0
        if self.cache_labels:
            self._signs = {key: signs}
        return signs

    def forward(self, image_features, text_features, logit_scale, logit_bias):
        if self.world_size > 1:
            from torch.distributed.nn.functional import all_gather

            text_features = torch.cat(all_gather(text_features), dim=0)
        logits = logit_scale * image_features @ text_features.T + logit_bias
        signs = self.signs(logits.shape[0], logits.shape[1], logits.device, logits.dtype)
        return -F.logsigmoid(signs * logits).sum() / image_features.shape[0]


def contrastive_step_with_accumulation(
    model: nn.Module,
    images: torch.Tensor,
    texts: torch.Tensor,
    loss_fn: nn.Module,
    micro_batches: int,
    autocast_ctx: Optional[Callable] = None,
    aux_loss_fn: Optional[Callable] = None,
    aux_weights: Optional[dict] = None,
) -> dict:
    """Accumulate parameter gradients of the exact full-batch contrastive loss over micro-batches.

    model(images, texts) must return open_clip's dict (image_features, text_features, logit_scale
    and, for SigLIP, logit_bias). `loss_fn` is a ClipLoss / SigLipLoss. `autocast_ctx` is a
    zero-argument callable returning a context manager for the tower forwards (e.g.
    `lambda: torch.autocast("cpu", dtype=torch.bfloat16)`); the loss itself runs in float32.
    `aux_loss_fn(images_mb, texts_mb, outputs_mb) -> {name: mean-reduced loss}` adds auxiliary
    terms on each micro-batch, each scaled by `aux_weights[name]` (default 1) and by the
    micro-batch's share of the batch, so its gradient is that of the full-batch mean. The caller
    zeroes gradients before and steps the optimiser after.

    Returns detached scalars: {"loss", "contrastive_loss", and each auxiliary term's full-batch
    mean under its own name}. RNG state is replayed so
    dropout / patch dropout draw the same masks in both passes. Under DistributedDataParallel the
    gradient all-reduce happens only on the last micro-batch.
    """
    autocast_ctx = autocast_ctx or nullcontext
    image_chunks = torch.tensor_split(images, micro_batches)
    text_chunks = torch.tensor_split(texts, micro_batches)
    rng_states, cached = [], []
    with torch.no_grad():
        for image_chunk, text_chunk in zip(image_chunks, text_chunks):
            rng_states.append(_rng_state(images.device))
            with autocast_ctx():
                cached.append(model(image_chunk, text_chunk))

    leaves = _feature_leaves(cached)
    contrastive = loss_fn(*_loss_args(leaves))
    contrastive.backward()

    weights, aux_means = aux_weights or {}, {}
    batch_size = images.shape[0]
    for index, (image_chunk, text_chunk) in enumerate(zip(image_chunks, text_chunks)):
        _set_rng_state(rng_states[index], images.device)
        is_last = index == len(image_chunks) - 1
        with _sync_context(model, is_last):
            with autocast_ctx():
                outputs = model(image_chunk, text_chunk)
            surrogate = _surrogate(outputs, leaves, index, include_scalars=index == 0)
            share = image_chunk.shape[0] / batch_size
            for name, term in (aux_loss_fn(image_chunk, text_chunk, outputs) if aux_loss_fn else {}).items():
                surrogate = surrogate + weights.get(name, 1.0) * share * term
                aux_means[name] = aux_means.get(name, 0.0) + share * term.detach().float()
            surrogate.backward()

    total = contrastive.detach() + sum(weights.get(name, 1.0) * mean for name, mean in aux_means.items())
    return {"contrastive_loss": contrastive.detach(), **aux_means, "loss": total}


def _feature_leaves(cached: list[dict]) -> dict:
    """Full-batch features (float32) and scalars as graph leaves whose .grad the loss will fill."""
    def leaf(tensor):  # detach: open_clip returns the logit_bias Parameter itself, not a copy
        return tensor.detach().float().requires_grad_(True)

    leaves = {
        "image_features": [leaf(out["image_features"]) for out in cached],
        "text_features": [leaf(out["text_features"]) for out in cached],
        "logit_scale": leaf(cached[0]["logit_scale"]),
    }
    if cached[0].get("logit_bias") is not None:
        leaves["logit_bias"] = leaf(cached[0]["logit_bias"])
    return leaves


def _loss_args(leaves: dict) -> list:
    args = [torch.cat(leaves["image_features"]), torch.cat(leaves["text_features"]), leaves["logit_scale"]]
    if "logit_bias" in leaves:
        args.append(leaves["logit_bias"])
    return args


def _surrogate(outputs: dict, leaves: dict, index: int, include_scalars: bool) -> torch.Tensor:
    """A scalar whose gradient w.r.t. the parameters is the loss gradient through this micro-batch.

    sum(features * dL/dfeatures) back-propagates dL/dfeatures; logit_scale (and logit_bias) are
    the same parameter in every micro-batch, so their cached gradient is injected once.
    """
    total = sum(
        (outputs[key] * leaves[key][index].grad.to(outputs[key].dtype)).sum()
        for key in ("image_features", "text_features")
    )
    if include_scalars:
        for key in ("logit_scale", "logit_bias"):
            if key in leaves:
                total = total + (outputs[key] * leaves[key].grad.to(outputs[key].dtype)).sum()
    return total


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _sync_context(model: nn.Module, is_last: bool):
    """DDP's no_sync for all but the last micro-batch (one gradient all-reduce per step)."""
    if is_last or not hasattr(model, "no_sync"):
        return nullcontext()
    return model.no_sync()
