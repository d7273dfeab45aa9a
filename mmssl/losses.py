"""Contrastive objectives with open_clip's API and numbers: CLIP's InfoNCE and SigLIP's sigmoid loss.

Both take features straight from the towers and a `logit_scale` that is already exponentiated
(the model holds it in log space, initialised to log(1/0.07); `clamp_logit_scale` keeps it at or
below log(100) after each optimiser step). Across processes the features are all-gathered so the
loss sees the global batch; `gather_with_grad` routes gradients back to the rank that produced
each feature (otherwise only the local slice gets gradients, as in open_clip).

This module holds loss functions only; which terms make up the training loss, with what weights
and in what precision, is `mmssl.objective`'s business.
"""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

INIT_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature, in log space
MAX_LOGIT_SCALE = 100.0                 # CLIP clamps exp(logit_scale) here


def clamp_logit_scale(model: nn.Module, max_scale: float = MAX_LOGIT_SCALE) -> None:
    """Keep exp(logit_scale) in [1, max_scale]; call after every optimiser step, as CLIP does."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(max_scale))


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


class SimCLRLoss(nn.Module):
    """NT-Xent (SimCLR: Chen et al. 2020, arXiv:2002.05709) on two (N, D) batches of projections.

    With the 2N views z_1..z_2N L2-normalised, sim(u, v) = <u, v>, and p(i) the other view of
    view i's image:

        l(i) = -log( exp(sim(z_i, z_p(i)) / t) / sum_{k != i} exp(sim(z_i, z_k) / t) )
        loss = (1 / 2N) * sum_i l(i)

    so each view's positive is its partner and the other 2N - 2 views are its negatives. Across
    processes the views are all-gathered with gradient; rank r scores its own 2n anchors against
    all 2N views, so rank losses average to the global-batch loss and each rank's gradient is
    world_size x its share (the trainer's gradient average over ranks makes it exact).
    """

    def __init__(self, temperature: float = 0.1, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.temperature = temperature
        self.rank = rank
        self.world_size = world_size

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        if z1.shape != z2.shape or z1.dim() != 2:
            raise ValueError(f"SimCLRLoss needs two (N, D) batches of the same shape, got {tuple(z1.shape)} "
                             f"and {tuple(z2.shape)}")
        z1, z2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
        all1, all2 = z1, z2
        if self.world_size > 1:
            from torch.distributed.nn.functional import all_gather

            all1, all2 = torch.cat(all_gather(z1), dim=0), torch.cat(all_gather(z2), dim=0)
        n = z1.shape[0]
        labels = torch.arange(n, device=z1.device) + n * self.rank
        own = F.one_hot(labels, all1.shape[0]).bool()
        losses = []
        for anchors, partners, same_view in ((z1, all2, all1), (z2, all1, all2)):
            positives_and_others = anchors @ partners.T / self.temperature
            same = (anchors @ same_view.T / self.temperature).masked_fill(own, float("-inf"))  # not itself
            losses.append(F.cross_entropy(torch.cat([positives_and_others, same], dim=1), labels))
        return (losses[0] + losses[1]) / 2


def queue_contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, image_keys: torch.Tensor,
                           text_keys: torch.Tensor, image_queue: torch.Tensor, text_queue: torch.Tensor,
                           logit_scale: torch.Tensor, offset: int = 0, distill_alpha: float = 0.0) -> torch.Tensor:
    """ALBEF's image-text contrastive loss with a momentum queue (Li et al. 2021, eq. 1-3).

    Each of this rank's n online images is scored against the momentum text keys of the global
    batch followed by the text queue, and each online text against the image keys and the image
    queue: logits = logit_scale * <online, key>. Row i's positive is key `offset + i` (its own
    sample's momentum key; offset = rank * n). The targets are one-hot, or with distillation
    (1 - alpha) * one-hot + alpha * softmax(the momentum features' own logits against the same
    columns). loss = (CE_i2t + CE_t2i) / 2, each the mean over rows of -sum_j target_ij log p_ij.
    Keys and queues are constants (no gradient); the queues hold only filled entries. With empty
    queues and keys equal to the online features it is CLIP's InfoNCE (`ClipLoss`).
    """
    rows = torch.arange(image_features.shape[0], device=image_features.device)
    all_texts = torch.cat([text_keys, text_queue]).detach()
    all_images = torch.cat([image_keys, image_queue]).detach()
    per_image = logit_scale * image_features @ all_texts.T
    per_text = logit_scale * text_features @ all_images.T
    targets = torch.zeros_like(per_image)
    targets[rows, rows + offset] = 1.0
    targets_i2t = targets_t2i = targets
    if distill_alpha > 0:
        with torch.no_grad():
            scale = logit_scale.detach()
            own = slice(offset, offset + image_features.shape[0])
            soft_i2t = F.softmax(scale * image_keys[own] @ all_texts.T, dim=1)
            soft_t2i = F.softmax(scale * text_keys[own] @ all_images.T, dim=1)
        targets_i2t = distill_alpha * soft_i2t + (1 - distill_alpha) * targets
        targets_t2i = distill_alpha * soft_t2i + (1 - distill_alpha) * targets
    loss_i2t = -(F.log_softmax(per_image, dim=1) * targets_i2t).sum(dim=1).mean()
    loss_t2i = -(F.log_softmax(per_text, dim=1) * targets_t2i).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


def moco_loss(queries: torch.Tensor, keys: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """MoCo's InfoNCE (He et al. 2020, eq. 1): each query's positive is its own key (the other view
    of the same image through the momentum encoder), its negatives the queue's keys.

    loss = mean_i -log( exp(q_i.k_i / t) / (exp(q_i.k_i / t) + sum_j exp(q_i.queue_j / t)) ), on
    L2-normalised queries, keys and queue rows; keys and queue are constants (no gradient).
    """
    queries = F.normalize(queries, dim=-1)
    keys = F.normalize(keys, dim=-1).detach()
    positive = (queries * keys).sum(dim=1, keepdim=True)
    negative = queries @ F.normalize(queue, dim=-1).detach().T
    logits = torch.cat([positive, negative], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(queries.shape[0], dtype=torch.long, device=queries.device))


def class_contrastive_loss(logits_per_image: torch.Tensor, logits_per_text: torch.Tensor,
                           labels: torch.Tensor) -> torch.Tensor:
    """FLYP's loss: CLIP's symmetric InfoNCE between images and their class prompts, where every
    pair of the same class is a positive (uniform soft target over them), so the batch's repeated
    classes are not pushed apart as false negatives. `labels`: the class of each row/column."""
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits_per_image.float(), targets) + F.cross_entropy(logits_per_text.float(), targets))
