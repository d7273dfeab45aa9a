"""`train.fsdp=true`: the towers' blocks sharded over the ranks with FSDP2 (`fully_shard`).

What is sharded: every open_clip transformer block (`...resblocks.N`) of the image and text towers
and the four residual stages of a ResNet image tower, each its own FSDP unit (its parameters are
DTensors sharded on dim 0; a unit is all-gathered for its forward and for its backward, and its
gradients are reduce-scattered, i.e. averaged over the ranks). These are what dominates a dual
encoder's parameters. The objective is the FSDP root, owning no parameters itself, so the blocks
reshard after each forward; the objective's other entry points (`encode`, `aux_terms`, `draw`:
what gradient accumulation calls) are registered as FSDP forward methods. Everything else (embeddings, projections, norms, the
temperature, the heads) stays an ordinary replicated tensor: those parameters are read directly, not
only through a module's forward, and are small; their gradients are all-reduced as without FSDP.

Precision: one policy (`mmssl.train.policy`). Parameters stay fp32 and the towers run under autocast,
so FSDP all-gathers and reduces in fp32 (the default `MixedPrecisionPolicy`).

Checkpoints hold full (unsharded) tensors, gathered on rank 0 with `torch.distributed.checkpoint.
state_dict`: the model's state dict has the keys and shapes it has without FSDP, so the checkpoint
loads in one process (`mmssl.create_model`, eval, export). The optimizer's state is keyed by
parameter name (that module's format, independent of how the groups were split), so a run resumes
with the `train.fsdp` it was written with (`check_resume`).
"""
from __future__ import annotations

import math
import sys

import torch
from torch import nn

from mmssl.errors import UserError

ENTRY_POINTS = ("encode", "aux_terms", "draw")   # what GradCache calls besides forward (hooked already)
RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


def check_supported(cfg) -> None:
    """Refuse, with one line, what `train.fsdp=true` does not support (`cfg`: the experiment config)."""
    if cfg.train.fsdp and (cfg.loss.kind == "moco" or cfg.loss.queue_size > 0):
        raise UserError("train.fsdp=true does not support a momentum encoder (loss.kind=moco, loss.queue_size): "
                        "its EMA copies the sharded towers")
    check_train_section(cfg.train)


def check_train_section(train_cfg) -> None:
    """The refusals that depend on the `train` section alone (also what `mmssl finetune` passes)."""
    if not train_cfg.fsdp:
        return
    if train_cfg.compile:
        raise UserError("train.fsdp=true does not support train.compile=true: compile the towers without FSDP")
    if train_cfg.val_every:
        raise UserError("train.fsdp=true does not support train.val_every: validation runs on rank 0 alone; "
                        "set train.val_every=0 and evaluate the checkpoints")


def check_resume(path, state: dict, sharded: bool) -> None:
    """A run resumes with the optimizer-state format it saved (`fsdp` in the checkpoint)."""
    saved = bool(state.get("fsdp", False))
    if saved != sharded:
        raise UserError(f"{path} was written with train.fsdp={str(saved).lower()} under torchrun; resume it "
                        f"with the same train.fsdp (now {str(sharded).lower()})")


def shard_blocks(model: nn.Module) -> list[nn.Module]:
    """The block modules `wrap` shards: transformer blocks and ResNet stages of the towers."""
    stages = {f"visual.{stage}" for stage in RESNET_STAGES}
    blocks, seen = [], set()
    for name, module in model.named_modules():
        parts = name.split(".")
        in_blocks = len(parts) >= 2 and parts[-2] == "resblocks" and parts[-1].isdigit()
        if (in_blocks or name in stages) and id(module) not in seen:
            seen.add(id(module))
            blocks.append(module)
    return blocks


def wrap(objective: nn.Module, env) -> bool:
    """Shard `objective.model`'s blocks over the process group (True), or leave a single process as
    it is (False, saying so): with one rank there is nothing to shard and the run is the plain one."""
    if not env.is_distributed:
        if env.is_main:
            sys.stderr.write("mmssl: train.fsdp=true in a single process: nothing to shard, training unsharded\n")
        return False
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    blocks = shard_blocks(objective.model)
    if not blocks:
        raise UserError("train.fsdp=true found no transformer blocks or ResNet stages to shard in this model")
    for block in blocks:
        fully_shard(block)
    inside = {id(p) for block in blocks for p in block.parameters()}
    replicated = {p for p in objective.parameters() if id(p) not in inside}
    fully_shard(objective, ignored_params=replicated)   # the root: owns nothing, drives the blocks' resharding
    for name in ENTRY_POINTS:
        if callable(getattr(objective, name, None)):
            register_fsdp_forward_method(objective, name)
    return True


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a DTensor (without importing torch.distributed.tensor, which is slow to
    import, when nothing has: then nothing can be one)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def clip_gradients(params: list, max_norm: float) -> torch.Tensor:
    """`clip_grad_norm_` over sharded and replicated parameters together: the global norm of all
    gradients (the sharded ones' norm reduced over the ranks), every gradient scaled by the same factor."""
    with_grad = [p for p in params if p.grad is not None]
    sharded = [p for p in with_grad if is_sharded(p)]
    plain = [p for p in with_grad if not is_sharded(p)]
    squares = []
    if sharded:   # a DTensor norm of the shards; full_tensor() sums it over the ranks
        squares.append(torch.nn.utils.get_total_norm([p.grad for p in sharded]).full_tensor() ** 2)
    if plain:
        squares.append(torch.nn.utils.get_total_norm([p.grad for p in plain]) ** 2)
    total = torch.stack(squares).sum().sqrt() if squares else torch.zeros(())
    if math.isfinite(max_norm):
        for group in (sharded, plain):
            if group:
                torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_model_state(model: nn.Module) -> dict:
    """The unsharded `model.state_dict()` on rank 0, on the CPU (other ranks: {}); every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def load_full_model_state(model: nn.Module, state: dict) -> None:
    """Load an unsharded state dict into the sharded model (every rank passes the full state)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_options(strict=True))


def full_optimizer_state(objective: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's unsharded state on rank 0, on the CPU, keyed by parameter name (other ranks: {});
    every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(objective, optimizer, options=_options(cpu_offload=True))


def load_full_optimizer_state(objective: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load `full_optimizer_state`'s output into the optimizer of the sharded objective (every rank
    passes the full state; each keeps its shards)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(objective, optimizer, state, options=_options())
