"""DeepCluster: k-means pseudo-labels recover well-separated blobs, empty clusters are re-seeded,
batches are uniform over clusters, the clustering sample is the first images of data.train through
the eval transform, `loss.kind=deepcluster` trains and re-clusters on schedule, exactly under
accumulation and resume, the same clustering on every rank, and a weight of 0 builds nothing."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import (CPU, accumulation_matches, assert_resumes_exactly, close_process_group,
                     config, objective_for, token_batch)
from mmssl.config import load_config
from mmssl.errors import UserError
from mmssl.heads.deepcluster import (_KMEANS, KMEANS_THREADS, cluster_features, cluster_members, derived_seed,
                                     faiss_threads, fill_empty_clusters, normalized_mutual_info,
                                     uniform_over_clusters)
from mmssl.train.loop import build_trainer, train

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ("heads.deepcluster.k=8", "heads.deepcluster.sample=64", "heads.deepcluster.every_steps=2")


def blobs(per_blob=(60, 60, 60, 60), dim=8, spread=0.05, seed=0):
    """Gaussian blobs around 4 orthogonal unit centres in `dim`-D (well separated), and their labels."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim, dtype=np.float32)[:len(per_blob)]
    truth = np.concatenate([np.full(count, blob) for blob, count in enumerate(per_blob)])
    points = centres[truth] + spread * rng.standard_normal((len(truth), dim)).astype(np.float32)
    order = rng.permutation(len(truth))
    return points[order].astype(np.float32), truth[order]


def contingency(a, b):
    table = np.zeros((a.max() + 1, b.max() + 1), dtype=int)
    np.add.at(table, (a, b), 1)
    return table


# ---------------------------------------------------------------- clustering

@pytest.mark.parametrize("pca_dim", [0, 4])
def test_kmeans_pseudo_labels_are_the_true_blobs_up_to_permutation(pca_dim):
    points, truth = blobs()
    before = points.copy()
    result = cluster_features(points, k=4, pca_dim=pca_dim, niter=20, seed=3)
    assert np.array_equal(points, before)                           # the caller's features untouched
    table = contingency(truth, result.labels)
    # a permutation: every true blob lands in exactly one cluster, and every cluster holds one blob
    assert table.shape == (4, 4)
    assert ((table > 0).sum(1) == 1).all() and ((table > 0).sum(0) == 1).all()
    assert sorted(table.max(1).tolist()) == [60, 60, 60, 60]
    assert normalized_mutual_info(truth, result.labels) == pytest.approx(1.0)
    assert result.reseeded == 0 and result.centroids.shape == (4, pca_dim or 8)
    assert result.pca_matrix.shape == (pca_dim, 8) and result.pca_bias.shape == (pca_dim,)
    norms = np.linalg.norm(result.centroids, axis=1)   # centroids of L2-normalised points: near the sphere
    assert (norms > 0.8).all() and (norms <= 1.0 + 1e-5).all()


def test_pca_whitening_is_faiss_and_projects_the_points_as_clustered():
    points, _ = blobs(dim=8)
    result = cluster_features(points, k=4, pca_dim=3, seed=0)
    whitened = points @ result.pca_matrix.T + result.pca_bias
    assert np.allclose(whitened.mean(0), 0, atol=1e-4)              # centred
    covariance = np.cov(whitened.T, bias=True)                          # whitened: equal variances (FAISS
    assert np.allclose(covariance / covariance[0, 0], np.eye(3), atol=1e-3)   # scales them to 1/N), uncorrelated
    normed = whitened / np.linalg.norm(whitened, axis=1, keepdims=True)
    nearest = ((normed[:, None] - result.centroids[None]) ** 2).sum(-1).argmin(1)
    assert (nearest == result.labels).all()


def test_clustering_is_reproducible_bit_for_bit_whatever_the_faiss_threads():
    import faiss

    points, _ = blobs(per_blob=(200, 150, 100, 50), spread=0.4, seed=5)
    with faiss_threads(2):
        first = cluster_features(points, k=16, pca_dim=6, niter=10, seed=11)
        assert faiss.omp_get_max_threads() == 2                   # restored after the clustering
    again = cluster_features(points, k=16, pca_dim=6, niter=10, seed=11)
    assert np.array_equal(first.labels, again.labels) and np.array_equal(first.centroids, again.centroids)
    assert np.array_equal(first.pca_matrix, again.pca_matrix)
    other = cluster_features(points, k=16, pca_dim=6, niter=10, seed=12)
    assert not np.array_equal(first.centroids, other.centroids)    # the seed matters
    assert KMEANS_THREADS == 1


def test_a_sample_narrower_than_the_pca_has_no_nan():
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.standard_normal((10, 4)), np.zeros((10, 6))], 1).astype(np.float32)
    result = cluster_features(points, k=3, pca_dim=10, seed=0)      # 6 null directions, whitened
    assert np.isfinite(result.centroids).all() and np.isfinite(result.pca_matrix).all()
    assert np.bincount(result.labels, minlength=3).min() > 0


# ---------------------------------------------------------------- empty clusters

def test_empty_clusters_are_reseeded_by_splitting_the_largest_by_nearest():
    # two clusters of 6 and 2 points, clusters 1 and 3 empty
    points = np.array([[0, 0], [0.1, 0], [0.2, 0], [1.0, 0], [1.1, 0], [1.2, 0], [5, 5], [5.1, 5]], np.float32)
    labels = np.array([0, 0, 0, 0, 0, 0, 2, 2])
    centroids = np.array([[0.6, 0], [9, 9], [5.05, 5], [-9, -9]], np.float32)
    new_centroids, new_labels, filled = fill_empty_clusters(points, centroids, labels, eps=0.1)
    counts = np.bincount(new_labels, minlength=4)
    assert filled == 2 and (counts > 0).all() and counts.sum() == 8
    # 1: cluster 0 (mean (0.6, 0)) splits at (0.6, 0) +- 0.1 (1, -1): its right half moves to cluster 1;
    # 3: cluster 0, now (0, 0) (0.1, 0) (0.2, 0), splits about (0.1, 0): the point nearer (0.2, -0.1) moves
    assert new_labels.tolist() == [0, 0, 3, 1, 1, 1, 2, 2]
    np.testing.assert_allclose(new_centroids, [[0, 0.1], [0.7, -0.1], [5.05, 5], [0.2, -0.1]], atol=1e-6)
    assert centroids[1].tolist() == [9, 9] and labels.tolist() == [0, 0, 0, 0, 0, 0, 2, 2]   # inputs untouched


def test_identical_points_are_split_in_halves_and_kmeans_fills_every_cluster():
    points = np.repeat(np.eye(3, 4, dtype=np.float32), 4, axis=0)     # 12 points, 3 distinct
    labels = np.repeat(np.arange(3), 4)
    centroids = np.concatenate([np.eye(3, 4), np.zeros((3, 4))]).astype(np.float32)
    _, new_labels, filled = fill_empty_clusters(points, centroids, labels)
    counts = np.bincount(new_labels, minlength=6)
    assert filled == 3 and (counts > 0).all() and counts.sum() == 12 and counts.max() == 2
    result = cluster_features(points, k=6, seed=0)                    # k larger than the distinct points
    counts = np.bincount(result.labels, minlength=6)
    assert (counts > 0).all() and counts.sum() == 12
    with pytest.raises(ValueError, match="cannot fill"):
        fill_empty_clusters(points[:2], centroids, labels[:2])


# ---------------------------------------------------------------- sampling

def test_batches_are_uniform_over_clusters_and_members_even_when_clusters_are_unbalanced():
    sizes = {0: 2, 1: 20, 3: 200, 4: 2000}                            # cluster 2 empty
    labels = torch.cat([torch.full((size,), cluster) for cluster, size in sizes.items()])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    generator = torch.Generator().manual_seed(1)
    rows = torch.cat([uniform_over_clusters(labels, 100, generator) for _ in range(400)])
    per_cluster = torch.bincount(labels[rows], minlength=5)
    assert per_cluster[2] == 0
    expected = len(rows) / 4
    assert (abs(per_cluster[[0, 1, 3, 4]] - expected) < 0.05 * expected).all(), per_cluster
    small = torch.bincount(rows[labels[rows] == 1], minlength=len(labels))[labels == 1]   # 20 members
    assert (abs(small.float() - expected / 20) < 0.25 * expected / 20).all()
    members = cluster_members(labels)
    again = uniform_over_clusters(labels, 100, torch.Generator().manual_seed(1), members)
    assert torch.equal(again, rows[:100])                               # seeded: the same rows


def test_normalized_mutual_information():
    a = np.repeat(np.arange(4), 24)
    assert normalized_mutual_info(a, (a + 1) % 4) == pytest.approx(1.0)           # renamed: the same
    assert normalized_mutual_info(a, np.tile(np.arange(4), 24)) == pytest.approx(0.0, abs=1e-9)   # independent
    assert 0 < normalized_mutual_info(a, np.repeat(np.arange(8), 12)) < 1         # refined


# ---------------------------------------------------------------- the clustering sample

def test_the_sample_is_the_first_training_images_through_the_eval_transform(world):
    import mmssl
    from mmssl.data.cluster_sample import cluster_sample_for
    from mmssl.data.eval_loader import build_eval_loader
    from mmssl.models import image_transform

    cfg = load_config(None, [f"model.name={world / 'micro.json'}", f"data.train={world / 'syn' / 'train'}",
                             "loss.kind=deepcluster", *SMALL])
    model = mmssl.create_model(cfg.model)
    sample = cluster_sample_for(cfg, model)
    assert sample.dtype == torch.uint8 and sample.shape == (64, 3, 32, 32)
    loader = build_eval_loader(world / "syn" / "train", transform=image_transform(model, train=False),
                               batch_size=64, num_workers=0, decode_size=32)
    first = next(iter(loader)).images                                   # shard order, no shuffle
    objective, _ = objective_for(world / "micro.json", "loss.kind=deepcluster", *SMALL)
    head = objective.heads["deepcluster"]
    head.attach_sample(sample)
    assert torch.equal(head.sample_images(torch.arange(64)), first)     # normalised as the transform does
    assert torch.equal(cluster_sample_for(cfg, model), sample)          # deterministic


def test_fewer_images_than_the_sample_uses_them_all_and_fewer_than_k_is_refused(world, plain_images, tmp_path):
    import mmssl
    from mmssl.data.cluster_sample import cluster_sample_for

    def sample_of(*overrides):
        cfg = load_config(None, [f"model.name={world / 'micro.json'}", f"data.train={plain_images}",
                                 "loss.kind=deepcluster", *overrides])
        return cluster_sample_for(cfg, mmssl.create_model(cfg.model))

    assert sample_of("heads.deepcluster.k=8", "heads.deepcluster.sample=100").shape[0] == 48   # all 48
    with pytest.raises(UserError, match=r"heads\.deepcluster\.sample"):
        sample_of("heads.deepcluster.k=64", "heads.deepcluster.sample=100")
    with pytest.raises(UserError, match=r"heads\.deepcluster\.sample"):          # the config itself
        load_config(None, ["loss.kind=deepcluster", "heads.deepcluster.k=8", "heads.deepcluster.sample=4"])
    with pytest.raises(UserError, match=r"heads\.deepcluster\.sample"):          # and through training
        build_trainer(config(world, tmp_path / "run", f"data.train={plain_images}", "loss.kind=deepcluster",
                             "heads.deepcluster.k=64", "heads.deepcluster.sample=100"), CPU)


# ---------------------------------------------------------------- the objective

def attached(world, *overrides, images=64):
    objective, _ = objective_for(world / "micro.json", *overrides)
    sample = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    objective.heads["deepcluster"].attach_sample(sample, seed=0)
    return objective


def bincount_sum(head):
    return int(torch.bincount(head.assignments, minlength=head.cfg.k).sum())


def test_the_loss_is_cross_entropy_of_the_drawn_sample_rows_against_their_pseudo_labels(world):
    objective = attached(world, "loss.kind=deepcluster", *SMALL)
    head, model = objective.heads["deepcluster"], objective.model
    assert objective.weights == {"deepcluster_loss": 1.0} and set(objective.heads) == {"deepcluster"}
    images, texts = token_batch(rows=6)
    draw = objective.draw(images, texts, step=0).masks["deepcluster_loss"]
    assert int(head.cluster_step) == 0 and draw.indices.shape == draw.labels.shape == (6,)
    assert torch.equal(draw.labels, head.assignments[draw.indices])
    terms = objective(images, texts, step=1)                             # step 1: the step-0 clustering
    assert int(head.cluster_step) == 0 and len(head.history) == 1
    rows = objective.draw(images, texts, step=1).masks["deepcluster_loss"]
    with torch.no_grad():
        expected = F.cross_entropy(head.classify(model.visual(head.sample_images(rows.indices))), rows.labels)
    assert terms["deepcluster_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["deepcluster_loss"].item() == pytest.approx(np.log(8), abs=0.05)   # fresh classifier: ~uniform
    other = objective(torch.randn(6, 3, 32, 32), texts, step=1)          # the loader's images are not read
    assert other["deepcluster_loss"].item() == terms["deepcluster_loss"].item()
    assert bincount_sum(head) == 64 and (torch.bincount(head.assignments, minlength=8) > 0).all()


def test_reclustering_reinitialises_the_classifier_from_the_step_and_restores_train_mode(world):
    objective = attached(world, "loss.kind=deepcluster", *SMALL)
    head, model = objective.heads["deepcluster"], objective.model
    images, texts = token_batch(rows=4)
    objective.draw(images, texts, step=0)
    at_zero = head.classify.weight.detach().clone()
    assert head.classify.bias.abs().max() == 0 and 0.005 < at_zero.std() < 0.015
    with torch.no_grad():
        head.classify.weight.add_(1.0)
    objective.draw(images, texts, step=1)                                # not due: nothing changes
    assert torch.equal(head.classify.weight, at_zero + 1)
    objective.draw(images, texts, step=0)                                # already clustered at step 0
    assert len(head.history) == 1
    model.visual.eval()
    model.visual.transformer.train()                                     # a mixed mode survives
    objective.draw(images, texts, step=2)
    assert not model.visual.training and model.visual.transformer.training
    assert int(head.cluster_step) == 2 and not torch.equal(head.classify.weight, at_zero)
    fresh = attached(world, "loss.kind=deepcluster", *SMALL).heads["deepcluster"]
    fresh.recluster(objective.model, 0)
    torch.testing.assert_close(fresh.classify.weight, at_zero, rtol=0, atol=0)   # seeded by (seed, step)


def test_a_reclustering_step_names_the_classifier_for_fresh_optimizer_state(world, tmp_path):
    objective = attached(world, "loss.kind=deepcluster", *SMALL)
    head = objective.heads["deepcluster"]
    objective(*token_batch(rows=4), step=0)
    assert objective.reinitialised_parameters(0) == list(head.classify.parameters())
    assert objective.reinitialised_parameters(1) == []
    # in training: every re-clustering step restarts AdamW's count for the classifier, not the tower's
    from mmssl.train.loop import build_trainer
    from helpers import CPU

    trainer = build_trainer(make(world)(tmp_path / "run", "train.steps=3", "heads.deepcluster.every_steps=2"), CPU)
    fresh = trainer.objective.heads["deepcluster"].classify.weight
    tower = trainer.objective.model.visual.conv1.weight
    counts = []
    for _ in range(3):
        batch = next(iter(trainer.loader))
        trainer.train_step(batch.images, batch.texts)
        counts.append((int(trainer.optimizer.state[fresh]["step"]), int(trainer.optimizer.state[tower]["step"])))
    assert counts == [(1, 1), (2, 2), (1, 3)]                           # re-clustered at steps 0 and 2


def test_deepcluster_beside_clip_accumulates_exactly(world):
    objective = attached(world, "loss.deepcluster_weight=0.5", *SMALL)
    images, texts = token_batch(rows=12)
    grads = accumulation_matches(objective, images, texts, pieces=(2, 3))
    assert any(name.startswith("heads.deepcluster.classify") for name in grads)
    assert any(name.startswith("model.transformer.") for name in grads)


def test_heads_state_loads_after_attach_and_refuses_another_sample_size(world):
    objective = attached(world, "loss.kind=deepcluster", *SMALL, images=40)
    head = objective.heads["deepcluster"]
    head.draw(objective.model, torch.zeros(4, 3, 32, 32), step=0)
    state = head.state_dict()
    assert state["assignments"].shape == (40,) and state["assignments"].dtype == torch.int64
    assert state["centroids"].shape == (8, 32) and state["pca_matrix"].shape == (32, 32)
    assert int(state["cluster_step"]) == 0 and "mean" not in state

    fresh = attached(world, "loss.kind=deepcluster", *SMALL, images=40).heads["deepcluster"]
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.state_dict()[name], value) for name, value in state.items())
    unattached = objective_for(world / "micro.json", "loss.kind=deepcluster", *SMALL)[0].heads["deepcluster"]
    unattached.load_state_dict(state)                                    # sized by the checkpoint (64 -> 40)
    assert unattached.assignments.shape == (40,)
    other = attached(world, "loss.kind=deepcluster", *SMALL, images=48).heads["deepcluster"]
    with pytest.raises(UserError, match="clustering sample holds 48"):
        other.load_state_dict(state)


def test_weight_zero_builds_no_head_and_kind_refuses_its_own_weight(world):
    objective, _ = objective_for(world / "micro.json")
    assert "deepcluster" not in objective.heads
    with pytest.raises(UserError, match="loss.deepcluster_weight"):
        objective_for(world / "micro.json", "loss.kind=deepcluster", "loss.deepcluster_weight=1")


# ---------------------------------------------------------------- training

def make(world):
    def make_config(output, *extra):
        return config(world, output, "loss.kind=deepcluster", *SMALL, "train.batch_size=8", *extra)
    return make_config


def test_deepcluster_trains_and_reclusters_every_two_steps(world, tmp_path):
    trainer = build_trainer(make(world)(tmp_path / "run", "train.steps=5"), CPU)
    result = trainer.fit()
    head = trainer.objective.heads["deepcluster"]
    assert len(result.losses) == 5 and all(np.isfinite(result.losses)) and all(0 < loss < 4 for loss in result.losses)
    assert result.losses[0] == pytest.approx(np.log(8), abs=0.1)
    assert [entry["step"] for entry in head.history] == [0, 2, 4] and int(head.cluster_step) == 4
    assert head.sample.shape == (64, 3, 32, 32) and bincount_sum(head) == 64
    assert (torch.bincount(head.assignments, minlength=8) > 0).all()
    assert head.history[0]["nmi_previous"] is None and 0 <= head.history[1]["nmi_previous"] <= 1
    assert all(name.startswith("visual.") for name, p in trainer.objective.model.named_parameters()
               if p.requires_grad)                                        # the image tower alone


def test_deepcluster_resumes_exactly_across_a_reclustering(world, tmp_path):
    make_config = make(world)
    straight = train(make_config(tmp_path / "straight", "train.steps=6"))
    assert_resumes_exactly(make_config, tmp_path / "straight", straight, tmp_path / "resumed", steps=6)
    from mmssl.train.checkpoint import checkpoint_path

    saved = torch.load(checkpoint_path(tmp_path / "resumed", 3), weights_only=False)["heads"]["deepcluster"]
    assert int(saved["cluster_step"]) == 2 and saved["assignments"].shape == (64,)   # resumed at 3, re-clusters at 4


def test_accumulation_equals_the_straight_run(world, tmp_path):
    # within one clustering (step 0's, of the same initial weights). A later re-clustering is not
    # comparable: AdamW's first steps turn float-noise gradients of ~0 into +-lr weight differences,
    # and k-means, discontinuous, may then move a point or two (train.seed=3 does at step 2)
    make_config = make(world)
    straight = train(make_config(tmp_path / "straight", "train.steps=4", "heads.deepcluster.every_steps=4"))
    split = train(make_config(tmp_path / "split", "train.steps=4", "heads.deepcluster.every_steps=4",
                              "train.accum_steps=2"))
    assert split.losses == pytest.approx(straight.losses, rel=1e-4)


# ---------------------------------------------------------------- two gloo processes

def _rank_worker(rank, port, micro_json, out_dir):
    import torch.distributed as dist

    import mmssl
    from mmssl.objective import Objective

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    cfg = load_config(None, [f"model.name={micro_json}", "loss.kind=deepcluster", *SMALL])
    torch.manual_seed(rank)                                    # different towers: rank 1 would cluster otherwise
    objective = Objective(mmssl.create_model(cfg.model).train(), cfg, rank=rank, world_size=2)
    head = objective.heads["deepcluster"]
    head.attach_sample(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8,
                                     generator=torch.Generator().manual_seed(4)), seed=0)
    own = head.embed_sample(objective.model)
    draw = head.draw(objective.model, torch.zeros(16, 3, 32, 32), step=0)
    torch.save({"state": head.state_dict(), "indices": draw.indices, "own": own}, f"{out_dir}/rank{rank}.pt")
    close_process_group()


def test_every_rank_holds_rank_zeros_clustering_and_draws_its_own_rows(micro_json, tmp_path):
    import torch.multiprocessing as mp

    from helpers import free_port

    mp.spawn(_rank_worker, args=(free_port(), micro_json, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    assert not np.array_equal(ranks[0]["own"], ranks[1]["own"])        # the towers did differ
    for name, value in ranks[0]["state"].items():
        assert torch.equal(ranks[1]["state"][name], value), name
    alone = cluster_features(ranks[0]["own"], 8, 32, 20, derived_seed(_KMEANS, 0, 0))   # rank 0's own clustering
    assert np.array_equal(alone.labels, ranks[1]["state"]["assignments"].numpy())
    assert not torch.equal(ranks[0]["indices"], ranks[1]["indices"])   # each rank its own rows
