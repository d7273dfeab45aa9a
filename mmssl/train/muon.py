"""Muon for the transformer blocks' weight matrices, AdamW for every other parameter, as one optimizer.

Why: on the synthetic world the tiny ViT trained with AdamW gets colour right early but shape only
late, even when trained supervised (`bench/vit_shape_proxy.py`); Muon on its block matrices learns
shape within the tiny config's 300 steps, supervised and contrastive (figures: docs/benchmarks.md,
"Learning check").
Muon (K. Jordan et al., 2024) replaces each matrix's update by the nearest semi-orthogonal
matrix to its Nesterov momentum (a quintic Newton-Schulz iteration, run in bf16 where the hardware
has it natively and in fp32 elsewhere: `mmssl.train.policy.fast_matmul_dtype`), so every direction of
the matrix moves at the same rate instead of the few dominant ones.
Embeddings, the patch convolution, projections, norms, biases and the temperature are not
block matrices and keep AdamW (with CLIP's decay split), as the method prescribes.

One `torch.optim.Optimizer` rather than two, so the schedule (LambdaLR), checkpoints and resume
treat it like AdamW: groups carry `muon=True/False`, and the schedule scales both learning rates.
Muon groups get no weight decay (with lr 0.02 a decay of 0.1 would shrink weights 0.2% a step).
Under FSDP (`train.fsdp`) a sharded matrix is gathered, orthogonalized whole on every rank, and each
rank applies its own rows of the update, so the step is the unsharded one.
"""
from __future__ import annotations

import math
import re

import torch
from torch.optim.adamw import adamw

from mmssl.train.fsdp import is_sharded

NEWTON_SCHULZ_COEFFS = (3.4445, -4.7750, 2.0315)  # the published quintic, 5 iterations


def orthogonalize(matrix: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximately U V^T of `matrix` = U S V^T: singular values within ~100x of the largest end in ~[0.5, 1.2]."""
    return orthogonalize_all([matrix], steps, dtype)[0]


def orthogonalize_all(matrices: list, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> list:
    """`orthogonalize` of every matrix, those of one shape (after turning tall ones wide) stacked
    and iterated together as batched matmuls: the tiny ViT's 32 block matrices fall into 3 shapes,
    so a step runs 3 small batched products per iteration instead of 32 separate ones."""
    a, b, c = NEWTON_SCHULZ_COEFFS
    oriented = [m.to(dtype).mT if m.shape[0] > m.shape[1] else m.to(dtype) for m in matrices]
    by_shape: dict = {}
    for i, x in enumerate(oriented):
        by_shape.setdefault(tuple(x.shape), []).append(i)
    results = [None] * len(matrices)
    for rows in by_shape.values():
        x = torch.stack([oriented[i] for i in rows])
        x = x / (torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True) + 1e-7)
        for _ in range(steps):
            gram = x @ x.mT
            x = a * x + (b * gram + c * gram @ gram) @ x
        for i, result in zip(rows, x):
            tall = matrices[i].shape[0] > matrices[i].shape[1]
            results[i] = (result.mT if tall else result).to(matrices[i].dtype)
    return results


RESNET_STAGE = re.compile(r"(^|\.)visual\.layer\d+\.")   # open_clip ModifiedResNet's residual stages


def is_block_matrix(name: str, param: torch.Tensor) -> bool:
    """2-D weights inside open_clip transformer blocks (attention in/out, MLP), and the conv filters
    of ResNet stages, orthogonalized as out x (in * kh * kw) matrices as in the CIFAR-10 speedruns
    (the stem and the attention pool stay on AdamW)."""
    if param.ndim == 4:
        return RESNET_STAGE.search(name) is not None
    return param.ndim == 2 and ".resblocks." in f".{name}"


class MuonAdamW(torch.optim.Optimizer):
    """Groups with `muon=True` take Muon steps (lr, momentum); the others AdamW steps (lr, betas, eps, weight_decay)."""

    def __init__(self, groups: list, lr: float, betas=(0.9, 0.98), eps: float = 1e-6, momentum: float = 0.95,
                 newton_schulz_dtype: torch.dtype = torch.bfloat16):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0, momentum=momentum, muon=False)
        super().__init__(groups, defaults)
        self.newton_schulz_dtype = newton_schulz_dtype

    @torch.no_grad()
    def step(self, closure=None):
        muon = []                      # (param, group) of every Muon matrix, stepped together
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["muon"]:
                muon.extend((param, group) for param in params)
            elif params:
                self._adamw(params, group)
        if muon:
            self._muon(muon)

    def _muon(self, entries: list) -> None:
        """Nesterov momentum of every matrix, orthogonalized in same-shape batches, then applied."""
        directions = []
        for param, group in entries:
            state = self.state[param]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(param)
            buf, beta = state["momentum_buffer"], group["momentum"]
            buf.mul_(beta).add_(param.grad)
            nesterov = param.grad.add(buf, alpha=beta)
            # train.fsdp: orthogonalize the whole matrix, each rank keeps its own rows (below)
            whole = nesterov.full_tensor() if is_sharded(nesterov) else nesterov
            directions.append(whole.flatten(1))   # a conv filter bank as out x (in * kh * kw)
        updates = orthogonalize_all(directions, dtype=self.newton_schulz_dtype)
        for (param, group), update in zip(entries, updates):
            scale = math.sqrt(max(1.0, update.shape[0] / update.shape[1]))
            update = update.view(param.shape)
            if is_sharded(param):
                from torch.distributed.tensor import distribute_tensor

                update = distribute_tensor(update, param.device_mesh, param.placements, src_data_rank=None)
            param.add_(update, alpha=-group["lr"] * scale)

    def _adamw(self, params: list, group: dict) -> None:
        """torch's own AdamW update over the group (its fused kernel where the device has one)."""
        for param in params:
            state = self.state[param]
            if not state:
                state.update(step=torch.zeros((), dtype=torch.float32, device=param.device),
                             exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
              [], [s["step"] for s in states], fused=all(p.device.type in ("cpu", "cuda") for p in params),
              amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
              eps=group["eps"], maximize=False)
