"""AdamW with CLIP's weight-decay split, and a linear-warmup cosine learning-rate schedule.

Why the split: decaying gains, biases, class/positional tokens stored as 1-D vectors or the
temperature pulls them toward zero for no regularisation benefit (they do not scale the function
the way weight matrices do); open_clip and the CLIP paper exclude them, so do we.
"""
from __future__ import annotations

import math

import torch

from mmssl.train.fsdp import is_sharded
from mmssl.train.policy import fast_matmul_dtype
from mmssl.train.muon import MuonAdamW, is_block_matrix

NO_DECAY_NAMES = ("logit_scale", "logit_bias")


def uses_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Matrices and conv kernels decay; norms, biases, 1-D embeddings and the temperature do not."""
    return param.ndim >= 2 and not name.split(".")[-1] in NO_DECAY_NAMES


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over the trainable parameters (frozen ones, e.g. LiT towers, are skipped;
    four under FSDP: `split_sharded`)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if uses_weight_decay(name, param) else no_decay).append(param)
    return split_sharded([
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ])


def split_sharded(groups: list[dict]) -> list[dict]:
    """With FSDP (`train.fsdp`), each group split into its sharded (DTensor) and replicated
    parameters, because one fused AdamW call cannot mix the two; unchanged without FSDP."""
    if not any(is_sharded(p) for group in groups for p in group["params"]):
        return groups
    return [{**group, "params": [p for p in group["params"] if is_sharded(p) == sharded]}
            for group in groups for sharded in (True, False)]


def build_optimizer(model: torch.nn.Module, train_cfg) -> torch.optim.Optimizer:
    """`train.optimizer`: AdamW (the fused kernel where the device has it), or Muon + AdamW (`muon`)."""
    if train_cfg.optimizer == "muon":
        return build_muon(model, train_cfg)
    groups = param_groups(model, train_cfg.weight_decay)
    params = [p for group in groups for p in group["params"]]
    kwargs = dict(lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2), eps=train_cfg.eps)
    if params and all(p.device.type in ("cpu", "cuda") for p in params):
        kwargs["fused"] = True  # one kernel over all parameters instead of a Python loop per tensor
    return torch.optim.AdamW(groups, **kwargs)


def build_muon(model: torch.nn.Module, train_cfg) -> MuonAdamW:
    """Muon (lr `train.muon_lr`) on the transformer block matrices, AdamW (`train.lr`) on the rest."""
    block = [p for n, p in model.named_parameters() if p.requires_grad and is_block_matrix(n, p)]
    taken = {id(p) for p in block}
    groups = [{**group, "params": [p for p in group["params"] if id(p) not in taken]}
              for group in param_groups(model, train_cfg.weight_decay)]
    groups.append({"params": block, "muon": True, "lr": train_cfg.muon_lr})
    device = block[0].device if block else torch.device("cpu")
    return MuonAdamW(groups, lr=train_cfg.lr, betas=(train_cfg.beta1, train_cfg.beta2), eps=train_cfg.eps,
                     newton_schulz_dtype=fast_matmul_dtype(device))


def warmup_cosine(warmup: int, total: int):
    """Multiplier of the base lr at optimizer step `step` (0-based): linear ramp, then cosine to 0."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        decay_steps = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / decay_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR (its state_dict is just the step count, so resume is exact)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(train_cfg.warmup, train_cfg.steps))
