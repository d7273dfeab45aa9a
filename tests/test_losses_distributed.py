"""Two gloo processes: the distributed losses equal open_clip's and the single-process full batch.

What equality holds (global batch N = 2 x 4, rank r owns rows 4r..4r+3, L = full-batch loss):
- gather_with_grad=False, local_loss=False: every rank computes L itself, and only its own slice
  carries a graph, so each rank's feature gradient IS dL/d(its slice).
- gather_with_grad=True: autograd's all_gather sums every rank's contribution back to the owner.
  Rank losses average to L (local_loss=True: rank r scores only its rows; False: every rank has
  L), so each rank's feature gradient is world_size x dL/d(its slice); DDP's gradient averaging
  over ranks then yields exactly the full-batch parameter gradient. The logit_scale gradient,
  averaged over ranks, is dL/d(scale).
- SigLIP (texts gathered with gradient): rank losses average to L; the same world_size factor.
"""
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import close_process_group, free_port
from mmssl.losses import ClipLoss, SigLipLoss

WORLD, PER_RANK, DIM = 2, 4, 16
CLIP_SETTINGS = [(False, False), (False, True), (True, True), (True, False)]  # (local_loss, gather_with_grad)


def _open_clip_losses():
    """open_clip/loss.py loaded on its own: it needs only torch, and importing the open_clip package
    (timm, transformers, ...) would triple the start-up time of each spawned process."""
    package_dir = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0])
    spec = importlib.util.spec_from_file_location("open_clip_loss_standalone", package_dir / "loss.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _global_batch():
    generator = torch.Generator().manual_seed(1234)
    image = torch.nn.functional.normalize(torch.randn(WORLD * PER_RANK, DIM, generator=generator, dtype=torch.float64), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(WORLD * PER_RANK, DIM, generator=generator, dtype=torch.float64), dim=-1)
    return image, text


def _run(loss_fn, image, text, *scalars):
    """Loss value and gradients w.r.t. (image, text, *scalars) for fresh leaf copies."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (image, text, *scalars)]
    value = loss_fn(*leaves)
    value.backward()
    return value.detach(), [leaf.grad for leaf in leaves]


def _worker(rank, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    oc_loss = _open_clip_losses()
    image, text = _global_batch()
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    scale, bias = torch.tensor(14.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    results = {}
    for local_loss, with_grad in CLIP_SETTINGS:
        kwargs = dict(local_loss=local_loss, gather_with_grad=with_grad, rank=rank, world_size=WORLD)
        results[("clip", local_loss, with_grad)] = _run(ClipLoss(**kwargs), image[rows], text[rows], scale)
        results[("oc_clip", local_loss, with_grad)] = _run(oc_loss.ClipLoss(**kwargs), image[rows], text[rows], scale)
    siglip_args = (image[rows], text[rows], scale, bias)
    results["siglip"] = _run(SigLipLoss(rank=rank, world_size=WORLD), *siglip_args)
    results["oc_siglip"] = _run(oc_loss.SigLipLoss(rank=rank, world_size=WORLD), *siglip_args)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    close_process_group()


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD)]


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("local_loss,gather_with_grad", CLIP_SETTINGS)
def test_distributed_clip_loss_equals_open_clip(per_rank, local_loss, gather_with_grad):
    for results in per_rank:
        ours, our_grads = results[("clip", local_loss, gather_with_grad)]
        theirs, their_grads = results[("oc_clip", local_loss, gather_with_grad)]
        _close(ours, theirs)
        for mine, ref in zip(our_grads, their_grads):
            _close(mine, ref)


@pytest.mark.parametrize("local_loss,gather_with_grad", [(False, False), (False, True), (True, True)])
def test_distributed_clip_gradients_equal_full_batch(per_rank, local_loss, gather_with_grad):
    image, text = _global_batch()
    full_loss, (full_image, full_text, full_scale) = _run(ClipLoss(), image, text, torch.tensor(14.0, dtype=torch.float64))
    factor = WORLD if gather_with_grad else 1
    losses, scale_grads = [], []
    for rank, results in enumerate(per_rank):
        loss, (image_grad, text_grad, scale_grad) = results[("clip", local_loss, gather_with_grad)]
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        _close(image_grad, factor * full_image[rows])
        _close(text_grad, factor * full_text[rows])
        losses.append(loss)
        scale_grads.append(scale_grad)
        if not local_loss:
            _close(loss, full_loss)
    _close(torch.stack(losses).mean(), full_loss)
    if gather_with_grad:
        _close(torch.stack(scale_grads).mean(), full_scale)


def test_distributed_siglip_equals_open_clip_and_full_batch(per_rank):
    image, text = _global_batch()
    scalars = (torch.tensor(14.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64))
    full_loss, (full_image, full_text, full_scale, full_bias) = _run(SigLipLoss(), image, text, *scalars)
    losses = []
    for rank, results in enumerate(per_rank):
        ours, our_grads = results["siglip"]
        theirs, their_grads = results["oc_siglip"]
        _close(ours, theirs)
        for mine, ref in zip(our_grads, their_grads):
            _close(mine, ref)
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        _close(our_grads[0], WORLD * full_image[rows])
        _close(our_grads[1], WORLD * full_text[rows])
        losses.append(ours)
    _close(torch.stack(losses).mean(), full_loss)
