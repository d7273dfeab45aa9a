"""The momentum queue (ALBEF's image-text contrast with MoCo's queue): the loss against a float64
reference, the queue's FIFO order and wrap-around, the EMA update, exact accumulation and resume,
and the same queue on every rank."""
import copy

import pytest
import torch
import torch.nn.functional as F

import mmssl
from helpers import close_process_group, config, logged_losses
from mmssl.config import load_config
from mmssl.heads.momentum import MomentumTowers
from mmssl.losses import ClipLoss, queue_contrastive_loss
from mmssl.objective import Objective
from mmssl.train.accumulate import accumulated_backward

pytestmark = pytest.mark.usefixtures("one_thread")


def unit(rows, dim, seed):
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1)


def reference_loss(images, texts, image_keys, text_keys, image_queue, text_queue, scale, offset, alpha):
    """ALBEF's ITC written out row by row, in float64."""
    columns_t, columns_i = torch.cat([text_keys, text_queue]), torch.cat([image_keys, image_queue])
    total_i2t = total_t2i = 0.0
    for i in range(images.shape[0]):
        for query, columns, own_key, out in ((images[i], columns_t, image_keys[offset + i], "i2t"),
                                              (texts[i], columns_i, text_keys[offset + i], "t2i")):
            logits = torch.stack([scale * query @ column for column in columns])
            soft = torch.softmax(torch.stack([scale * own_key @ column for column in columns]), dim=0)
            target = torch.zeros(len(columns), dtype=torch.float64)
            target[offset + i] = 1.0
            target = alpha * soft + (1 - alpha) * target
            value = -(target * torch.log_softmax(logits, dim=0)).sum()
            if out == "i2t":
                total_i2t = total_i2t + value
            else:
                total_t2i = total_t2i + value
    return (total_i2t / images.shape[0] + total_t2i / images.shape[0]) / 2


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_queue_loss_and_its_gradient_match_a_float64_reference(alpha):
    images, texts = unit(6, 8, 0).requires_grad_(), unit(6, 8, 1).requires_grad_()
    image_keys, text_keys = unit(12, 8, 2), unit(12, 8, 3)          # a global batch of 2 ranks x 6
    image_queue, text_queue = unit(5, 8, 4), unit(5, 8, 5)
    scale = torch.tensor(14.0, dtype=torch.float64)
    args = (image_keys, text_keys, image_queue, text_queue, scale, 6, alpha)
    ours = queue_contrastive_loss(images, texts, *args)
    ours_grads = torch.autograd.grad(ours, [images, texts])
    expected = reference_loss(images, texts, *args)
    expected_grads = torch.autograd.grad(expected, [images, texts])
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(ours_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_with_empty_queues_and_keys_equal_to_the_features_it_is_clip_loss():
    images, texts = unit(8, 16, 0), unit(8, 16, 1)
    empty = torch.zeros(0, 16, dtype=torch.float64)
    scale = torch.tensor(10.0, dtype=torch.float64)
    ours = queue_contrastive_loss(images, texts, images, texts, empty, empty, scale)
    torch.testing.assert_close(ours, ClipLoss()(images, texts, scale), rtol=1e-12, atol=1e-12)


def towers(queue_size=5, momentum=0.9):
    model = torch.nn.Linear(4, 4)
    model.visual = torch.nn.Linear(2, 2)
    return model, MomentumTowers(model, queue_size, momentum, embed_dim=3)


def test_queue_is_fifo_wraps_around_and_counts_only_filled_rows():
    _, queue = towers(queue_size=5)
    assert queue.negatives()[0].shape == (0, 3)                    # never read before it is filled
    batches = [torch.full((2, 3), float(step)) for step in range(1, 5)]
    queue.enqueue(batches[0], -batches[0])
    assert queue.negatives()[0][:, 0].tolist() == [1, 1] and queue.negatives()[1][:, 0].tolist() == [-1, -1]
    queue.enqueue(batches[1], -batches[1])
    queue.enqueue(batches[2], -batches[2])                         # 6 keys into 5 rows: wraps to row 0
    assert int(queue.filled) == 5 and int(queue.position) == 1
    assert queue.image_queue[:, 0].tolist() == [3, 1, 2, 2, 3]     # the oldest key went first
    queue.enqueue(torch.arange(12.).view(4, 3), torch.zeros(4, 3))
    assert queue.image_queue[:, 0].tolist() == [3, 0, 3, 6, 9] and int(queue.position) == 0   # rows 1-4


def test_a_batch_larger_than_the_queue_keeps_its_newest_keys():
    _, queue = towers(queue_size=3)
    queue.enqueue(torch.full((1, 3), -1.0), torch.zeros(1, 3))
    keys = torch.arange(7.).view(7, 1).repeat(1, 3)
    queue.enqueue(keys, keys)
    assert sorted(queue.image_queue[:, 0].tolist()) == [4, 5, 6] and int(queue.filled) == 3
    queue.enqueue(torch.full((1, 3), 7.0), torch.zeros(1, 3))      # the next write replaces the oldest (4)
    assert sorted(queue.image_queue[:, 0].tolist()) == [5, 6, 7]


def test_momentum_update_is_the_ema_formula_and_trains_nothing():
    model, momentum = towers(momentum=0.9)
    assert not any(p.requires_grad for p in momentum.model.parameters())
    before = {name: p.detach().clone() for name, p in momentum.model.named_parameters()}
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    momentum.update(model)
    for name, param in momentum.model.named_parameters():
        online = dict(model.named_parameters())[name]
        torch.testing.assert_close(param, 0.9 * before[name] + 0.1 * online.detach())


# ---------------------------------------------------------------- inside the objective


def build(micro_json, *overrides):
    cfg = load_config(None, [f"model.name={micro_json}", "loss.queue_size=40", "loss.momentum=0.9", *overrides])
    torch.manual_seed(0)
    return Objective(mmssl.create_model(cfg.model).train(), cfg)


def batch(rows=16, seed=1):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(rows, 3, 32, 32, generator=generator)
    texts = torch.randint(1, 49000, (rows, 16), generator=generator)
    texts[:, 12:], texts[:, 11] = 0, 49407
    return images, texts


def test_queue_size_zero_builds_nothing(micro_json):
    cfg = load_config(None, [f"model.name={micro_json}"])
    torch.manual_seed(0)
    plain = Objective(mmssl.create_model(cfg.model), cfg)
    queued = build(micro_json)
    assert "momentum" not in plain.heads and plain.heads_state_dict() == {}
    trainable = [p for p in queued.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == sum(p.numel() for p in plain.parameters())


def test_a_steps_keys_join_the_queue_only_after_its_loss(micro_json):
    objective = build(micro_json)
    images, texts = batch()
    draws = objective.draw(images, texts, step=0)
    assert int(objective.momentum.filled) == 0               # not yet: the step's own keys are no negatives
    objective.end_step(draws)
    image_queue, text_queue = objective.momentum.negatives()
    torch.testing.assert_close(image_queue, draws.keys.images)
    torch.testing.assert_close(text_queue, draws.keys.texts)
    objective(*batch(seed=2), step=1)
    assert int(objective.momentum.filled) == 32


def test_accumulation_is_exact_with_the_queue_and_distillation(micro_json):
    objective = build(micro_json, "loss.distill_alpha=0.4")
    objective(*batch(seed=5), step=0)                         # a filled queue and a moved momentum model
    images, texts = batch(rows=24)
    results = []
    for pieces in (1, 4):
        twin = copy.deepcopy(objective)
        twin.zero_grad(set_to_none=True)
        if pieces == 1:
            terms = twin(images, texts, step=1)
            terms["loss"].backward()
        else:
            terms = accumulated_backward(twin, images, texts, pieces, step=1)
        grads = {name: p.grad.clone() for name, p in twin.named_parameters() if p.grad is not None}
        results.append((terms["loss"].detach(), grads, twin.momentum.image_queue.clone()))
    (full_loss, full, full_queue), (split_loss, split, split_queue) = results
    torch.testing.assert_close(split_loss, full_loss, rtol=1e-5, atol=1e-6)
    assert full.keys() == split.keys() and not any(name.startswith("heads.momentum") for name in full)
    for name, grad in full.items():
        torch.testing.assert_close(split[name], grad, rtol=1e-4, atol=max(1e-5 * grad.abs().max().item(), 1e-8))
    torch.testing.assert_close(split_queue, full_queue)


def test_resume_with_the_queue_is_bitwise(world, tmp_path):
    """20 + 20 steps equal 40, queue, momentum towers and distillation included (CPU, fp32)."""
    from helpers import CPU
    from mmssl.train.loop import build_trainer, train

    queue = ["train.steps=40", "loss.queue_size=100", "loss.distill_alpha=0.4"]   # wraps after 6 steps
    straight = train(config(world, tmp_path / "a", *queue))
    (tmp_path / "c").mkdir()
    first = build_trainer(config(world, tmp_path / "c", *queue, "train.save_every=20"), CPU)
    first.cfg.steps = 20
    first.fit()
    resumed = train(config(world, tmp_path / "c", *queue, "train.resume=latest"))
    assert resumed.losses == straight.losses[20:]
    assert logged_losses(tmp_path / "c") == logged_losses(tmp_path / "a")
    a = torch.load(tmp_path / "a/checkpoints/latest.pt", weights_only=True)
    c = torch.load(tmp_path / "c/checkpoints/latest.pt", weights_only=True)
    momentum = a["heads"]["momentum"]
    assert int(momentum["filled"]) == 100 and "image_queue" in momentum and "model.logit_scale" in momentum
    assert all(torch.equal(momentum[k], c["heads"]["momentum"][k]) for k in momentum)
    assert all(torch.equal(a["model"][k], c["model"][k]) for k in a["model"])
    loaded = mmssl.create_model(str(tmp_path / "a/checkpoints/latest.pt")).state_dict()   # eval/export: online towers
    assert loaded.keys() == a["model"].keys() and all(torch.equal(loaded[k], a["model"][k]) for k in loaded)
    assert not torch.equal(momentum["model.visual.conv1.weight"], a["model"]["visual.conv1.weight"])


# ---------------------------------------------------------------- two gloo processes

WORLD, PER_RANK, STEPS = 2, 8, 3


def _queue_worker(rank, port, micro_json, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    cfg = load_config(None, [f"model.name={micro_json}", "loss.queue_size=40", "loss.momentum=0.9",
                             "loss.distill_alpha=0.4"])
    torch.manual_seed(0)
    objective = Objective(mmssl.create_model(cfg.model).train(), cfg, rank=rank, world_size=WORLD)
    losses = []
    for step in range(STEPS):
        images, texts = batch(WORLD * PER_RANK, seed=10 + step)
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        losses.append(objective(images[rows], texts[rows], step=step)["loss"].detach())
    torch.save({"losses": losses, "queue": objective.heads_state_dict()["momentum"]}, f"{out_dir}/rank{rank}.pt")
    close_process_group()


def test_every_rank_holds_the_same_queue_as_one_process_on_the_whole_batch(micro_json, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_queue_worker, args=(port, micro_json, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    objective = build(micro_json, "loss.distill_alpha=0.4")
    single = [objective(*batch(WORLD * PER_RANK, seed=10 + step), step=step)["loss"].detach() for step in range(STEPS)]
    for name in ("image_queue", "text_queue", "position", "filled"):
        assert torch.equal(ranks[0]["queue"][name], ranks[1]["queue"][name]), name   # the same queue everywhere
        torch.testing.assert_close(ranks[0]["queue"][name], objective.momentum.state_dict()[name], rtol=1e-5, atol=1e-6)
    assert int(ranks[0]["queue"]["filled"]) == 40 and int(ranks[0]["queue"]["position"]) == 8   # 48 keys wrapped
    for step in range(STEPS):       # rank losses (each over its own rows) average to the whole batch's
        torch.testing.assert_close((ranks[0]["losses"][step] + ranks[1]["losses"][step]) / 2, single[step],
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("override, message", [
    ("loss.queue_size=-1", "bad value for loss.queue_size: -1 (must be an integer >= 0 (0: off))"),
    ("loss.momentum=1.0", "bad value for loss.momentum: 1.0 (must be in [0, 1))"),
    ("loss.distill_alpha=1.5", "bad value for loss.distill_alpha: 1.5 (must be in [0, 1])"),
    ("loss.moco_temperature=0", "bad value for loss.moco_temperature: 0.0 (must be > 0)"),
])
def test_bad_queue_settings_are_one_line_config_errors(micro_json, override, message):
    from mmssl.errors import UserError

    with pytest.raises(UserError) as caught:
        load_config(None, [f"model.name={micro_json}", override])
    assert str(caught.value) == message


def test_queue_combinations_that_cannot_work_are_refused(micro_json):
    from mmssl.errors import UserError

    with pytest.raises(UserError, match="loss.distill_alpha needs the momentum model"):
        build(micro_json, "loss.queue_size=0", "loss.distill_alpha=0.4")
    with pytest.raises(UserError, match="works with loss.kind=clip"):
        cfg = load_config(None, [f"model.name={micro_json}", "loss.queue_size=8", "loss.kind=siglip"])
        Objective(mmssl.create_model(cfg.model, siglip=True), cfg)
