"""DeepCluster (Caron et al. 2018, arXiv:1807.05520): classify images by the k-means cluster of
their own features, re-clustering as the features improve.

The clustering sample. `build_trainer` attaches a fixed sample of training images to the head
(`attach_sample`): the first `heads.deepcluster.sample` images of `data.train`, decoded with the
model's eval transform and kept as uint8 (`mmssl.data.cluster_sample`), the same on every rank
and every resume. DeepCluster clusters its whole training set each epoch; here the "epoch" is
`heads.deepcluster.every_steps` optimizer steps and the set is that sample.

Re-clustering (`draw` at step 0 and every `every_steps` steps after, and whenever no clustering
exists yet), as the reference implementation does it with FAISS:
1. embed the whole sample with the current image tower (`model.visual`, what the loss trains and
   every evaluation reads), batched, without gradient, the tower in eval mode (no patch dropout;
   each submodule's train/eval flag is restored after);
2. PCA-whiten to `pca_dim` dimensions (`faiss.PCAMatrix(d, pca_dim, eigen_power=-0.5)`; 0: no
   PCA; at most the embedding width), then L2-normalise;
3. `faiss.Kmeans(d, k, niter, seed)` with a seed derived from (train.seed, step), on every point
   (no subsampling), with one FAISS thread so the result depends on nothing but its input;
4. assign every sample image to its nearest centroid, and re-seed empty clusters as DeepCluster
   does (`fill_empty_clusters`): an empty cluster takes a copy of the largest cluster's centroid,
   the two are moved +-eps apart and the largest cluster's members go to the nearer one;
5. re-initialise the classifier (a Linear(embed_dim, k), DeepCluster's re-created top layer:
   weight N(0, 0.01), bias 0) from a generator seeded by (train.seed, step).

The pseudo-labels, centroids, PCA matrix and bias and the step of the last clustering are
registered buffers, so they are saved with the checkpoint's heads and a resumed run continues
from the exact clustering it stopped in (the buffer of labels takes the attached sample's size;
`load_state_dict` after `attach_sample` checks the sizes agree).

The training batch (`draw`, every step). DeepCluster samples images uniformly over clusters so a
huge cluster does not dominate: B rows (B = the loader's batch size) are drawn from the sample,
each by a cluster picked uniformly among the non-empty ones and then a member of it picked
uniformly, from a generator seeded by (train.seed, step, rank): exact on resume, different on
each rank. The loader's own images are ignored by the loss: it reads the drawn sample rows,
normalises them, and takes the classifier's cross-entropy against their pseudo-labels.

torchrun: every rank clusters (the towers are identical, so it costs no waiting), then rank 0's
labels, centroids, PCA and classifier init are broadcast so all ranks hold the same clustering.

Optimizer state: the classifier is re-initialised in place (the same Parameters); Caron et al.
re-create the layer, and its optimizer state with it, since the new clusters' classes are unrelated
to the old ones. `reinitialised_at(step)` names the classifier's parameters on a re-clustering step,
and the training loop drops their optimizer state (`Objective.reinitialised_parameters`), so AdamW
starts them afresh; the state dropped and rebuilt is part of the checkpoint, so resume stays exact.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmssl.config import DeepClusterHeadConfig
from mmssl.errors import UserError
from mmssl.data.train_loader import distributed_rank_world
from mmssl.heads.pretext import RowDraw, batch_share, embedding, normalisation

EMBED_BATCH = 256          # sample images per tower pass when re-clustering
SPLIT_EPS = 1e-4           # the +-offset between a re-seeded empty cluster and the one it splits
PCA_FLOOR = 1e-6           # eigenvalues below this fraction of the largest are floored (whitening
                           # would divide by ~0: a sample smaller than the width has null directions)
KMEANS_THREADS = 1         # FAISS threads for PCA, k-means and assignment: bitwise reproducible
HEAD_INIT_STD = 0.01       # DeepCluster's top layer: normal(0, 0.01), bias 0

# tags of the derived seeds, so the k-means, the classifier init and the batch never share one
_KMEANS, _HEAD, _BATCH = 1, 2, 3


def derived_seed(*parts: int) -> int:
    """A 63-bit seed mixing integer parts (numpy's SeedSequence: nearby inputs give unrelated seeds)."""
    state = np.random.SeedSequence([int(part) % 2**63 for part in parts]).generate_state(2, np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & (2**63 - 1)


@contextmanager
def faiss_threads(count: int):
    """FAISS (OpenMP) limited to `count` threads inside the block; the previous limit restored after."""
    import faiss

    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(count)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


# ---------------------------------------------------------------- clustering (numpy / FAISS)

@dataclass
class Clustering:
    labels: np.ndarray        # [N] int64 cluster of every point, none empty
    centroids: np.ndarray     # [k, p] float32, in the PCA-whitened, L2-normalised space
    pca_matrix: np.ndarray    # [p, d] float32 (p = 0: no PCA): y = normalise(A x + b)
    pca_bias: np.ndarray      # [p] float32
    reseeded: int             # empty clusters filled by splitting (step 4)


def fill_empty_clusters(points: np.ndarray, centroids: np.ndarray, labels: np.ndarray,
                        eps: float = SPLIT_EPS) -> tuple[np.ndarray, np.ndarray, int]:
    """(centroids, labels, filled) with no empty cluster, DeepCluster's way (FAISS's k-means split).

    While a cluster is empty: the largest cluster (lowest index among equals) gives it a copy of
    its centroid (the mean of its members: a stored centroid can be stale after an earlier split),
    the two centroids are moved apart (+eps and -eps along an alternating-sign direction) and the
    largest cluster's members go to the nearer of the two. Members that cannot be told apart (all
    at one point, or all on one side) are split in two halves in index order, so each pass fills
    one cluster and empties none. Needs at least as many points as clusters.
    """
    centroids, labels = centroids.astype(np.float32, copy=True), labels.astype(np.int64, copy=True)
    k = centroids.shape[0]
    if len(labels) < k:
        raise ValueError(f"{len(labels)} points cannot fill {k} clusters")
    counts = np.bincount(labels, minlength=k)
    direction = np.where(np.arange(centroids.shape[1]) % 2 == 0, 1.0, -1.0).astype(np.float32)
    filled = 0
    while (counts == 0).any():
        empty, largest = int(np.flatnonzero(counts == 0)[0]), int(np.argmax(counts))
        members = np.flatnonzero(labels == largest)
        x = points[members]
        base = x.mean(0)
        centroids[empty], centroids[largest] = base + eps * direction, base - eps * direction
        to_empty = ((x - centroids[empty]) ** 2).sum(1) < ((x - centroids[largest]) ** 2).sum(1)
        if to_empty.all() or not to_empty.any():
            to_empty = np.arange(len(members)) >= len(members) // 2
        labels[members[to_empty]] = empty
        counts[empty], counts[largest] = int(to_empty.sum()), int((~to_empty).sum())
        filled += 1
    return centroids, labels, filled


def cluster_features(features: np.ndarray, k: int, pca_dim: int = 0, niter: int = 20, seed: int = 0) -> Clustering:
    """DeepCluster's clustering of [N, d] features: PCA-whitening to `pca_dim` (0: none; at most d),
    L2 normalisation, FAISS k-means (`seed`, every point used), nearest-centroid labels with no
    empty cluster. Reproducible bit for bit: FAISS runs on KMEANS_THREADS threads."""
    import faiss

    x = np.array(features, dtype=np.float32, order="C", copy=True)   # normalised in place below
    n, d = x.shape
    if n < k:
        raise ValueError(f"{n} points cannot fill {k} clusters")
    p = min(pca_dim, d)
    with faiss_threads(KMEANS_THREADS):
        pca_matrix, pca_bias = np.zeros((0, d), np.float32), np.zeros((0,), np.float32)
        if p > 0:
            pca = faiss.PCAMatrix(d, p, -0.5)
            pca.train(x)
            eigenvalues = faiss.vector_to_array(pca.eigenvalues)
            pca.epsilon = float(PCA_FLOOR * max(float(eigenvalues.max()), 1e-30))
            pca.prepare_Ab()                                   # the whitening again, floored
            pca_matrix = faiss.vector_to_array(pca.A).reshape(p, d).astype(np.float32)
            pca_bias = faiss.vector_to_array(pca.b).astype(np.float32)
            x = np.ascontiguousarray(pca.apply_py(x), dtype=np.float32)
        faiss.normalize_L2(x)
        kmeans = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed % 2**31, verbose=False,
                              max_points_per_centroid=max(n, 1), min_points_per_centroid=1)
        kmeans.train(x)
        _, nearest = kmeans.index.search(x, 1)
    centroids, labels, filled = fill_empty_clusters(x, kmeans.centroids, nearest[:, 0])
    return Clustering(labels, centroids, pca_matrix, pca_bias, filled)


def normalized_mutual_info(a: np.ndarray, b: np.ndarray) -> float:
    """NMI of two labelings (arithmetic-mean normalisation, scikit-learn's default): DeepCluster's
    measure of how much the clustering changed between epochs. 1: the same partition."""
    _, a = np.unique(a, return_inverse=True)
    _, b = np.unique(b, return_inverse=True)
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1.0)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    nonzero = joint > 0
    mutual = float((joint[nonzero] * np.log(joint[nonzero] / np.outer(pa, pb)[nonzero])).sum())
    entropy = float(-(pa * np.log(pa)).sum() - (pb * np.log(pb)).sum()) / 2
    return 1.0 if entropy <= 0 else mutual / entropy


def uniform_over_clusters(labels: torch.Tensor, count: int, generator: torch.Generator,
                          members: Optional[tuple] = None) -> torch.Tensor:
    """[count] sample rows: per row a cluster uniform among the non-empty ones, then a member of it
    uniformly (`members`: `cluster_members(labels)`, when already known)."""
    order, starts, sizes = members if members is not None else cluster_members(labels)
    nonempty = torch.nonzero(sizes).flatten()
    picked = nonempty[torch.randint(len(nonempty), (count,), generator=generator)]
    offsets = (torch.rand(count, generator=generator, dtype=torch.float64) * sizes[picked]).long()
    return order[starts[picked] + torch.minimum(offsets, sizes[picked] - 1)]


def cluster_members(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows sorted by cluster, first position of each cluster in it, cluster sizes), on the CPU."""
    labels = labels.cpu()
    sizes = torch.bincount(labels)
    return torch.argsort(labels, stable=True), torch.cumsum(sizes, 0) - sizes, sizes


# ---------------------------------------------------------------- the head

@dataclass
class ClusterDraw(RowDraw):
    """One step's rows of the clustering sample and their pseudo-labels (CPU int64, [B] each)."""

    indices: torch.Tensor
    labels: torch.Tensor


class DeepClusterHead(nn.Module):
    """The k-way classifier of pseudo-labels, and the clustering state it is trained against."""

    def __init__(self, model: nn.Module, cfg: DeepClusterHeadConfig):
        super().__init__()
        self.cfg = cfg
        width = model.visual.output_dim
        self.classify = nn.Linear(width, cfg.k)
        reduced = min(cfg.pca_dim, width)
        self.register_buffer("assignments", torch.zeros(cfg.sample, dtype=torch.long))
        self.register_buffer("centroids", torch.zeros(cfg.k, reduced or width))
        self.register_buffer("pca_matrix", torch.zeros(reduced, width))
        self.register_buffer("pca_bias", torch.zeros(reduced))
        self.register_buffer("cluster_step", torch.tensor(-1, dtype=torch.long))   # -1: never clustered
        mean, std = normalisation(model)
        self.register_buffer("mean", mean, persistent=False)   # the model's: recomputed, never saved
        self.register_buffer("std", std, persistent=False)
        self.sample: Optional[torch.Tensor] = None   # [N, 3, H, W] uint8, CPU (not saved: re-read from data)
        self.seed = 0
        self.history: list = []                      # this process's clusterings: step, nmi to the previous, ...
        self._members: Optional[tuple] = None        # (CPU labels, cluster_members), rebuilt when they change

    # ---- the sample -------------------------------------------------------------------
    def attach_sample(self, images: torch.Tensor, seed: int = 0) -> None:
        """Hold `images` ([N, 3, H, W] uint8, k <= N <= heads.deepcluster.sample) as the clustering
        sample; `seed` (train.seed) seeds the k-means, classifier inits and batch draws."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"the clustering sample is uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        if not self.cfg.k <= len(images) <= self.cfg.sample:
            raise UserError(f"heads.deepcluster.sample: the clustering sample holds {len(images)} images; it needs "
                            f"between heads.deepcluster.k={self.cfg.k} and heads.deepcluster.sample={self.cfg.sample}")
        self.sample, self.seed = images.cpu().contiguous(), int(seed)
        if self.assignments.shape[0] != len(images):
            self.assignments = torch.zeros(len(images), dtype=torch.long, device=self.assignments.device)
            self.cluster_step.fill_(-1)
            self._members = None

    def _require_sample(self) -> torch.Tensor:
        if self.sample is None:
            raise RuntimeError("DeepCluster has no clustering sample: call attach_sample(images) first "
                               "(build_trainer does, from data.train)")
        return self.sample

    def sample_images(self, rows: torch.Tensor) -> torch.Tensor:
        """The sample's `rows` as the eval transform makes them: float, normalised, on the head's device."""
        pixels = self._require_sample()[rows.cpu()].to(self.mean.device, non_blocking=True)
        return pixels.to(torch.get_default_dtype()).div(255).sub_(self.mean).div_(self.std)

    # ---- clustering ---------------------------------------------------------------------
    @torch.no_grad()
    def embed_sample(self, model: nn.Module) -> np.ndarray:
        """[N, embed_dim] float32 embeddings of the whole sample by the current image tower (eval mode)."""
        visual = model.visual
        flags = [module.training for module in visual.modules()]
        visual.eval()
        try:
            rows = torch.arange(len(self._require_sample()))
            out = [embedding(model, self.sample_images(chunk)).float().cpu() for chunk in rows.split(EMBED_BATCH)]
        finally:
            for module, flag in zip(visual.modules(), flags):
                module.training = flag
        return torch.cat(out).numpy()

    @torch.no_grad()
    def recluster(self, model: nn.Module, step: int) -> None:
        """Cluster the sample's current embeddings, store the labels, re-initialise the classifier."""
        previous = self.assignments.cpu().numpy().copy() if int(self.cluster_step) >= 0 else None
        result = cluster_features(self.embed_sample(model), self.cfg.k, self.cfg.pca_dim, self.cfg.niter,
                                  derived_seed(_KMEANS, self.seed, step))
        device = self.assignments.device
        self.assignments.copy_(torch.from_numpy(result.labels).to(device))
        self.centroids.copy_(torch.from_numpy(result.centroids).to(device))
        self.pca_matrix.copy_(torch.from_numpy(result.pca_matrix).to(device))
        self.pca_bias.copy_(torch.from_numpy(result.pca_bias).to(device))
        self.cluster_step.fill_(step)
        generator = torch.Generator().manual_seed(derived_seed(_HEAD, self.seed, step))
        weight = torch.randn(self.classify.weight.shape, generator=generator) * HEAD_INIT_STD
        self.classify.weight.copy_(weight.to(self.classify.weight))
        self.classify.bias.zero_()
        self._broadcast_clustering()
        self._members = None
        labels = self.assignments.cpu().numpy()
        self.history.append({"step": step, "reseeded": result.reseeded,
                             "largest": int(np.bincount(labels, minlength=self.cfg.k).max()),
                             "nmi_previous": None if previous is None else normalized_mutual_info(previous, labels)})

    def _broadcast_clustering(self) -> None:
        """torchrun: every rank takes rank 0's clustering and classifier init (computed on all ranks)."""
        if distributed_rank_world()[1] == 1:
            return
        for tensor in (self.assignments, self.centroids, self.pca_matrix, self.pca_bias, self.cluster_step,
                       self.classify.weight.data, self.classify.bias.data):
            if tensor.numel():
                torch.distributed.broadcast(tensor, src=0)

    def reinitialised_at(self, step: int) -> list:
        """The classifier's parameters when `step` re-clustered (and re-initialised them), else []."""
        return list(self.classify.parameters()) if int(self.cluster_step) == step else []

    # ---- the pretext protocol -----------------------------------------------------------
    def draw(self, model: nn.Module, images: torch.Tensor, step: Optional[int]) -> ClusterDraw:
        """Re-cluster when due (step % every_steps == 0, or no clustering yet), then draw this step's rows."""
        self._require_sample()
        last = int(self.cluster_step)
        if last < 0 or (step is not None and step % self.cfg.every_steps == 0 and step != last):
            self.recluster(model, 0 if step is None else step)
        if self._members is None:
            labels = self.assignments.cpu()
            self._members = labels, cluster_members(labels)
        labels, members = self._members
        at = int(self.cluster_step) if step is None else step
        generator = torch.Generator().manual_seed(derived_seed(_BATCH, self.seed, at, distributed_rank_world()[0]))
        indices = uniform_over_clusters(labels, images.shape[0], generator, members)
        return ClusterDraw(indices, labels[indices])

    def loss(self, model: nn.Module, images: torch.Tensor, draw: ClusterDraw, batch_size: int) -> torch.Tensor:
        """Cross-entropy of the classifier on the drawn sample rows against their pseudo-labels (the
        loader's `images` are not used)."""
        logits = self.classify(embedding(model, self.sample_images(draw.indices)))
        per_row = F.cross_entropy(logits.float(), draw.labels.to(logits.device), reduction="none")
        return batch_share(per_row, batch_size)

    # ---- checkpoints ----------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """The saved labels may cover a sample of another size than heads.deepcluster.sample (the data
        held fewer): take their size, unless a sample of a different size is attached."""
        key = prefix + "assignments"
        saved = state_dict.get(key)
        if saved is not None and saved.shape != self.assignments.shape:
            if self.sample is not None:
                raise UserError(f"the checkpoint's DeepCluster labels cover {saved.shape[0]} images but the "
                                f"clustering sample holds {len(self.sample)}: data.train or "
                                f"heads.deepcluster.sample changed since it was written")
            self.assignments = torch.zeros(saved.shape, dtype=torch.long, device=self.assignments.device)
        self._members = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


PRETEXT_HEAD = DeepClusterHead
