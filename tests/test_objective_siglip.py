"""SigLIP: mmssl.losses.SigLipLoss equals open_clip's across processes (gloo), and the model's init."""
import math
import socket

import open_clip.loss as oc_loss
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import mmssl
from mmssl.errors import UserError
from mmssl.losses import SigLipLoss

BATCH, DIM = 5, 8


def _global_batch(world_size):
    generator = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(world_size * BATCH, DIM, generator=generator, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(world_size * BATCH, DIM, generator=generator, dtype=torch.float64), dim=-1)
    return image, text, torch.tensor(math.log(10.0), dtype=torch.float64).exp(), torch.tensor(-10.0, dtype=torch.float64)


def _value_and_grads(loss_fn, image, text, scale, bias):
    leaves = [t.detach().clone().requires_grad_(True) for t in (image, text, scale, bias)]
    value = loss_fn(*leaves)
    value.backward()
    return value.detach(), [leaf.grad for leaf in leaves]


def _worker(rank, world_size, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        image, text, scale, bias = _global_batch(world_size)
        local = slice(rank * BATCH, (rank + 1) * BATCH)
        ours = _value_and_grads(SigLipLoss(rank=rank, world_size=world_size), image[local], text[local], scale, bias)
        for impl in ("bidir", "shift", "gather"):
            theirs = _value_and_grads(oc_loss.SigLipLoss(rank=rank, world_size=world_size, dist_impl=impl),
                                      image[local], text[local], scale, bias)
            assert torch.allclose(ours[0], theirs[0], rtol=1e-12), (impl, ours[0], theirs[0])
            for a, b in zip(ours[1], theirs[1]):
                assert torch.allclose(a, b, rtol=1e-10, atol=1e-14), impl
        torch.save(ours[0], f"{out_dir}/loss_{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_siglip_matches_open_clip_across_processes(tmp_path):
    """Three ranks: open_clip's two-way ring ('bidir'), one-way ring ('shift') and 'gather' all agree with ours."""
    world_size = 3
    mp.spawn(_worker, args=(world_size, _free_port(), str(tmp_path)), nprocs=world_size, join=True)
    # each rank scores its images against every text; the rank mean is the one-process global loss
    image, text, scale, bias = _global_batch(world_size)
    global_loss = SigLipLoss()(image, text, scale, bias)
    rank_losses = torch.stack([torch.load(tmp_path / f"loss_{rank}.pt") for rank in range(world_size)])
    assert torch.allclose(rank_losses.mean(), global_loss, rtol=1e-12)


def test_siglip_model_init_and_objective_pick():
    from mmssl.config import load_config
    from mmssl.objective import Objective

    cfg = load_config(None, ["loss.kind=siglip"])
    model = mmssl.create_model(cfg.model, siglip=True)
    assert model.logit_scale.item() == pytest.approx(math.log(10.0))
    assert model.logit_bias.item() == -10.0
    objective = Objective(model, cfg)
    assert isinstance(objective.contrastive, SigLipLoss)
    assert "model.logit_bias" in dict(objective.named_parameters())
    with pytest.raises(UserError, match="siglip=True"):
        Objective(mmssl.create_model(cfg.model), cfg)
