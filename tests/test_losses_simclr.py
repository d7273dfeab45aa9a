"""SimCLRLoss (NT-Xent) against a hand-written float64 reference: values, gradients, and two gloo
processes equal to one process on the full batch."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import close_process_group, free_port
from mmssl.losses import SimCLRLoss

WORLD, PER_RANK, DIM, TAU = 2, 3, 8, 0.1


def nt_xent_reference(z1, z2, temperature):
    """The docstring's formula with Python loops: views 2k and 2k+1 of sample k are each other's positive."""
    views = []
    for a, b in zip(z1, z2):
        views += [a / a.norm(), b / b.norm()]
    total = 0.0
    for i, anchor in enumerate(views):
        partner = i + 1 if i % 2 == 0 else i - 1
        denominator = sum(torch.exp(anchor @ other / temperature) for k, other in enumerate(views) if k != i)
        total = total - torch.log(torch.exp(anchor @ views[partner] / temperature) / denominator)
    return total / len(views)


def _batch(n, seed, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(n, DIM, generator=generator, dtype=dtype),
            3 * torch.randn(n, DIM, generator=generator, dtype=dtype))


def _value_and_grads(loss_fn, z1, z2):
    z1, z2 = z1.detach().clone().requires_grad_(True), z2.detach().clone().requires_grad_(True)
    value = loss_fn(z1, z2)
    value.backward()
    return value.detach(), z1.grad, z2.grad


@pytest.mark.parametrize("n,temperature", [(1, 0.1), (2, 0.5), (6, 0.1), (6, 1.0)])
def test_simclr_loss_equals_reference_values_and_gradients(n, temperature):
    z1, z2 = _batch(n, seed=n)
    ours = _value_and_grads(SimCLRLoss(temperature), z1, z2)
    reference = _value_and_grads(lambda a, b: nt_xent_reference(a, b, temperature), z1, z2)
    for mine, ref in zip(ours, reference):
        torch.testing.assert_close(mine, ref, rtol=1e-10, atol=1e-12)
    if n > 1:  # one sample: the partner is the only other view, loss 0, no gradient
        assert ours[0] > 0 and ours[1].abs().sum() > 0 and ours[2].abs().sum() > 0


def test_simclr_loss_hand_computed():
    # one sample, two views: the only other view is the positive, so the loss is -log(1) = 0
    assert SimCLRLoss()(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])).item() == 0.0
    # two samples at right angles, views identical: positive sim 1, negatives 0 (other sample's two views)
    z = torch.tensor([[5.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    expected = -math.log(math.exp(1 / TAU) / (math.exp(1 / TAU) + 2))
    assert SimCLRLoss(TAU)(z, z.clone()).item() == pytest.approx(expected, rel=1e-12)


def test_simclr_loss_refuses_mismatched_views():
    with pytest.raises(ValueError, match="same shape"):
        SimCLRLoss()(torch.zeros(3, 4), torch.zeros(2, 4))


def _worker(rank, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    z1, z2 = _batch(WORLD * PER_RANK, seed=7)
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    result = _value_and_grads(SimCLRLoss(TAU, rank=rank, world_size=WORLD), z1[rows], z2[rows])
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    close_process_group()


def test_simclr_loss_across_two_gloo_processes_equals_full_batch(tmp_path):
    """Rank r scores its own 2n anchors against all 2N views: rank losses average to the full-batch
    loss L, and each rank's gradient is world_size x dL/d(its rows), which the trainer's gradient
    averaging over ranks turns into the full-batch gradient (as for ClipLoss with gather_with_grad)."""
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    z1, z2 = _batch(WORLD * PER_RANK, seed=7)
    full, full_z1, full_z2 = _value_and_grads(SimCLRLoss(TAU), z1, z2)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    torch.testing.assert_close(torch.stack([r[0] for r in results]).mean(), full, rtol=1e-10, atol=1e-12)
    for rank, (_, grad1, grad2) in enumerate(results):
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        torch.testing.assert_close(grad1, WORLD * full_z1[rows], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad2, WORLD * full_z2[rows], rtol=1e-10, atol=1e-12)
