"""MoCo v2 on the image tower (`loss.kind=moco`): the loss against a float64 reference, MoCo's
defaults, what trains and what does not, the key queue, exact accumulation and resume."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mmssl
from helpers import CPU, config, logged_losses
from mmssl.config import load_config
from mmssl.losses import moco_loss
from mmssl.objective import Objective
from mmssl.train.accumulate import accumulated_backward
from mmssl.train.loop import build_trainer, train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_moco_loss_and_gradient_match_a_float64_reference():
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(5, 8, generator=generator, dtype=torch.float64).requires_grad_()
    keys, queue = torch.randn(5, 8, generator=generator, dtype=torch.float64), torch.randn(7, 8, generator=generator, dtype=torch.float64)

    def reference(q):
        total = 0.0
        for i in range(q.shape[0]):
            qi = q[i] / q[i].norm()
            positive = torch.exp(qi @ (keys[i] / keys[i].norm()) / 0.2)
            negatives = sum(torch.exp(qi @ (row / row.norm()) / 0.2) for row in queue)
            total = total - torch.log(positive / (positive + negatives))
        return total / q.shape[0]

    ours, expected = moco_loss(queries, keys, queue, 0.2), reference(queries)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(ours, queries)[0], torch.autograd.grad(expected, queries)[0],
                               rtol=1e-10, atol=1e-12)


def build(micro_json, *overrides):
    cfg = load_config(None, [f"model.name={micro_json}", "loss.kind=moco", *overrides])
    torch.manual_seed(0)
    return Objective(mmssl.create_model(cfg.model).train(), cfg)


def views(rows=12, seed=1):
    return torch.randn(2, rows, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_moco_defaults_and_only_the_image_tower_and_head_train(micro_json):
    objective = build(micro_json)
    head = objective.heads["moco"]
    assert set(objective.heads) == {"moco"} and objective.image_only and objective.needs_views
    assert head.momentum.queue_size == 65536 and head.momentum.momentum == 0.999 and head.temperature == 0.2
    assert head.momentum.text_queue.numel() == 0                      # image keys only
    trainable = {name for name, p in objective.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(("model.visual.", "heads.moco.projection.")) for name in trainable)
    assert not any(p.requires_grad for p in head.momentum.parameters())


def test_each_step_moves_the_key_encoder_then_queues_its_keys(micro_json):
    objective = build(micro_json, "loss.queue_size=30", "loss.momentum=0.5")
    head = objective.heads["moco"]
    online = dict(objective.model.visual.named_parameters())
    with torch.no_grad():
        for param in online.values():
            param.add_(0.1)                         # the online tower moved since the copy was made
    before = {name: p.clone() for name, p in head.momentum.model.visual.named_parameters()}
    batch = views()
    terms = objective(batch[0], None, step=0, views=batch)
    for name, param in head.momentum.model.visual.named_parameters():
        torch.testing.assert_close(param, 0.5 * before[name] + 0.5 * online[name].detach())
    keys = F.normalize(head.momentum.model.projection(head.momentum.model, batch[1]), dim=-1)
    torch.testing.assert_close(head.momentum.negatives()[0], keys)   # after the step: its 12 keys
    assert set(terms) == {"moco_loss", "loss"} and torch.equal(terms["loss"], terms["moco_loss"])
    objective(batch[0], None, step=1, views=views(seed=2))
    objective(batch[0], None, step=2, views=views(seed=3))
    assert int(head.momentum.filled) == 30 and int(head.momentum.position) == 6   # 36 keys into 30 rows


def test_accumulation_is_exact_for_moco(micro_json):
    objective = build(micro_json, "loss.queue_size=50")
    first = views(seed=4)
    objective(first[0], None, step=0, views=first)                    # a queue to read
    batch = views(rows=15, seed=5)
    results = []
    for pieces in (1, 3):
        twin = copy.deepcopy(objective)
        twin.zero_grad(set_to_none=True)
        if pieces == 1:
            terms = twin(batch[0], None, step=1, views=batch)
            terms["loss"].backward()
        else:
            terms = accumulated_backward(twin, batch[0], None, pieces, step=1, views=batch)
        grads = {name: p.grad.clone() for name, p in twin.named_parameters() if p.grad is not None}
        results.append((terms["loss"].detach(), grads, twin.heads["moco"].momentum.image_queue.clone()))
    (full_loss, full, full_queue), (split_loss, split, split_queue) = results
    torch.testing.assert_close(split_loss, full_loss, rtol=1e-5, atol=1e-6)
    assert full.keys() == split.keys() and len(full) > 10
    for name, grad in full.items():
        torch.testing.assert_close(split[name], grad, rtol=1e-4, atol=max(1e-5 * grad.abs().max().item(), 1e-8))
    torch.testing.assert_close(split_queue, full_queue)


def test_moco_training_on_caption_free_shards_resumes_exactly(world, plain_images, tmp_path):
    def moco(output, *extra):
        return config(world, output, f"data.train={plain_images}", "loss.kind=moco", "loss.queue_size=20",
                      "train.batch_size=8", "data.workers=1", "data.shuffle_buffer=16", "train.steps=6", *extra)

    straight = train(moco(tmp_path / "a"))
    assert len(straight.losses) == 6 and all(np.isfinite(straight.losses))
    (tmp_path / "b").mkdir()
    first = build_trainer(moco(tmp_path / "b", "train.save_every=3"), CPU)
    first.cfg.steps = 3
    first.fit()
    resumed = train(moco(tmp_path / "b", "train.resume=latest"))
    assert resumed.losses == straight.losses[3:]
    assert logged_losses(tmp_path / "b") == logged_losses(tmp_path / "a")
    a = torch.load(tmp_path / "a/checkpoints/latest.pt", weights_only=True)
    b = torch.load(tmp_path / "b/checkpoints/latest.pt", weights_only=True)
    assert int(a["heads"]["moco"]["momentum.filled"]) == 20
    assert all(torch.equal(a["heads"]["moco"][k], b["heads"]["moco"][k]) for k in a["heads"]["moco"])


# ---------------------------------------------------------------- MAE alone, the image-only baseline


def test_mae_kind_is_inpainting_alone_on_the_image_tower(micro_json, world, plain_images, tmp_path):
    from helpers import exit_code
    from mmssl.errors import UserError

    cfg = load_config(None, [f"model.name={micro_json}", "loss.kind=mae", "heads.inpaint.decoder_width=32",
                             "heads.inpaint.decoder_depth=1", "heads.inpaint.decoder_heads=2"])
    torch.manual_seed(0)
    objective = Objective(mmssl.create_model(cfg.model).train(), cfg)
    assert set(objective.heads) == {"inpaint"} and objective.image_only and not objective.needs_views
    images = views()[0]
    torch.manual_seed(3)
    terms = objective(images, None, step=0)
    assert set(terms) == {"inpaint_loss", "loss"} and torch.equal(terms["loss"], terms["inpaint_loss"])
    torch.manual_seed(3)                      # the same masks through the head directly
    mask = objective.heads["inpaint"].sample_mask(objective.model, images)
    torch.testing.assert_close(terms["inpaint_loss"], objective.heads["inpaint"](objective.model, images, mask).float())
    with pytest.raises(UserError, match="loss.kind=mae is inpainting alone"):
        Objective(mmssl.create_model(cfg.model), load_config(None, [f"model.name={micro_json}", "loss.kind=mae",
                                                                      "loss.inpaint_weight=1"]))
    trained = train(config(world, tmp_path / "mae", f"data.train={plain_images}", "loss.kind=mae", "train.steps=2",
                           "train.batch_size=8", "data.workers=1", "data.shuffle_buffer=16"))
    assert len(trained.losses) == 2 and all(np.isfinite(trained.losses))
    assert exit_code(["eval", "zeroshot", "--checkpoint", str(trained.checkpoint), "--data",
                      str(world / "syn" / "val")]) == 2                     # no trained text tower
