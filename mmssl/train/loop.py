"""The training loop: batches -> objective terms -> one optimizer step, with logs, checkpoints, resume.

`train(cfg)` is what `mmssl train` runs: it joins the torchrun group (if any), builds the pieces
from the config (`build_trainer`) and runs `Trainer.fit`. The `Trainer` itself sees its `train`
config section and interfaces, so tests and other callers can hand it their own objective or loader:

* objective: an `nn.Module` with `.model` (the dual encoder), `forward(images, texts, step[, views])`
  returning named loss terms with their weighted total under "loss", the pieces exact-batch
  accumulation calls (`draw`, `encode`, `batch_feature_keys`, `batch_terms`, `aux_terms`, `total`; see
  `mmssl.objective` and `mmssl.train.accumulate`), and `heads_state_dict` /
  `load_heads_state_dict` for checkpoints;
* loader: an endless iterable of batches with `.images` / `.texts` (and `.views` when asked; `.labels`
  instead of `.texts` for fine-tuning, `mmssl.finetune`), plus `state_dict`,
  `load_state_dict` and `corrupt_count` (see `mmssl.data.train_loader.TrainLoader`).

Semantics worth knowing: `train.batch_size` is the contrastive batch of one rank per optimizer
step (the global batch is batch_size x world_size); `train.accum_steps` splits it into that many
micro-batches for the forward/backward without changing the loss (GradCache). Step k (1-based)
is the k-th optimizer update (AdamW, or Muon for the block matrices: `train.optimizer`); a
checkpoint at step k holds the state after it.

Across ranks, gradients are averaged with one coalesced all-reduce after the backward pass instead
of DistributedDataParallel: the objective runs the towers several times per step (contrastive
branch, heads, the accumulation's recompute passes), which DDP's one-forward-one-backward
bookkeeping does not fit; the averaged gradient is the same. With `train.fsdp=true` the towers'
blocks are sharded with FSDP2 instead (`mmssl.train.fsdp`): their gradients are reduce-scattered by
FSDP, the replicated rest goes through the same all-reduce, and checkpoints stay unsharded.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch

from mmssl.config import ExperimentConfig, TrainConfig, to_dict
from mmssl.errors import UserError
from mmssl.losses import clamp_logit_scale
from mmssl.train.policy import compute_dtype, default_device, emulation_note, grad_scaler, resolve_precision
from mmssl.train import checkpoint as ckpt
from mmssl.train import fsdp
from mmssl.train.accumulate import accumulated_backward
from mmssl.train.allocator import keep_freed_memory
from mmssl.train.attention import training_attention
from mmssl.train.distributed import DistEnv, broadcast_object, gather_objects, init_distributed, shutdown
from mmssl.train.metrics import MetricsLog, WindowTimer, progress_bar
from mmssl.train.optim import build_optimizer, build_scheduler


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN/inf; the run stopped before applying that update."""


@dataclass
class TrainResult:
    step: int                         # optimizer steps done
    output: Path
    checkpoint: Optional[Path]        # the last checkpoint written (rank 0), if any
    losses: list = field(default_factory=list)  # total loss of every step this process ran
    last_log: dict = field(default_factory=dict)


def train(cfg: ExperimentConfig) -> TrainResult:
    """Run `mmssl train` for a resolved config (joins the torchrun group when launched by it)."""
    resolve_precision(cfg.train.precision, default_device())  # refuse fp16 on CPU before anything starts
    began = time.perf_counter()   # records' train_wall_s counts from here: model and loader building included
    env = init_distributed()
    finished = False
    try:
        result = build_trainer(cfg, env).fit(began)
        finished = True
        return result
    finally:
        shutdown(env, together=finished)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_trainer(cfg: ExperimentConfig, env: DistEnv) -> "Trainer":
    """Model, objective, loader, optimizer and schedule from the config, on this rank's device."""
    from mmssl.data.train_loader import build_train_loader
    from mmssl.data.views import model_augmentation
    from mmssl.models import create_model, image_transform
    from mmssl.objective import Objective

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if env.device.type == "cpu":
        keep_freed_memory()
    precision = resolve_precision(cfg.train.precision, env.device)
    fsdp.check_supported(cfg)
    seed_everything(cfg.train.seed)  # identical initial weights on every rank
    model = create_model(cfg.model, siglip=cfg.loss.kind == "siglip")
    objective = Objective(model, cfg, rank=env.rank, world_size=env.world_size, precision=precision).to(env.device)
    if "deepcluster" in objective.heads:   # DeepCluster clusters a fixed sample of data.train: read it once, here
        from mmssl.data.cluster_sample import cluster_sample_for

        objective.heads["deepcluster"].attach_sample(cluster_sample_for(cfg, model), seed=cfg.train.seed)
    image_size = model.visual.image_size
    loader = build_train_loader(
        cfg.data,
        transform=image_transform(model, train=cfg.data.augment),
        tokenizer=None if objective.image_only else model.tokenizer,
        batch_size=cfg.train.batch_size,
        seed=cfg.train.seed,
        decode_size=None if cfg.data.augment or objective.needs_views else max(_pair(image_size)),
        rank=env.rank,
        world_size=env.world_size,
        captions=not objective.image_only,
        views=model_augmentation(model) if objective.needs_views else None,
    )
    validate = None
    if cfg.train.val_every:
        from mmssl.train.validation import ZeroShotValidation

        validate = ZeroShotValidation(cfg.data.val, env.device, precision, cfg.data.allow_remote)
    return Trainer(cfg.train, env, objective, loader, config_record=to_dict(cfg), validate=validate)


def _pair(size) -> tuple:
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


class Trainer:
    """Owns one run's state (objective, optimizer, schedule, scaler, loader, step) and its I/O.

    `cfg` is the `train` section; `config_record` is the whole experiment config as a dict, saved in
    every checkpoint so the model can be rebuilt from it.
    """

    def __init__(self, cfg: TrainConfig, env: DistEnv, objective: torch.nn.Module, loader, *,
                 config_record: dict, validate: Optional[Callable] = None):
        self.cfg, self.env, self.objective, self.loader, self.validate = cfg, env, objective, loader, validate
        self.config_record = config_record
        self.output = Path(cfg.output)
        self.device = env.device
        self.sharded = False
        if self.device.type == "cpu":
            _channels_last_conv_tower(objective.model)
        if cfg.fsdp:
            fsdp.check_train_section(cfg)
            _broadcast_parameters(objective, env)   # rank 0's initial weights, before they are split
            self.sharded = fsdp.wrap(objective, env)
        self.params = [p for p in objective.parameters() if p.requires_grad]
        self.replicated = [p for p in self.params if not fsdp.is_sharded(p)]   # all of them without FSDP
        self.optimizer = build_optimizer(objective, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        precision = resolve_precision(cfg.precision, self.device)
        self.precision_note = emulation_note(precision, self.device)
        self.scaler = grad_scaler(precision, self.device)
        self.step = 0
        self.last_checkpoint: Optional[Path] = None
        self._resume(ckpt.start_point(self.output, cfg.resume, cfg.overwrite, may_write=env.is_main))
        _broadcast_parameters(objective, env)
        self.attention = partial(training_attention, objective.model, self.device, compute_dtype(precision))
        if cfg.compile:
            _compile_towers(objective.model)

    # ---- one optimizer step -------------------------------------------------------------
    def train_step(self, images: torch.Tensor, texts: Optional[torch.Tensor], views=None) -> dict:
        """Forward, backward, gradient all-reduce, clip, optimizer step; returns the terms as floats."""
        self.objective.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.attention():
            terms = self._forward_backward(images, texts, views)
        values = self._mean_over_ranks(terms)
        for param in self.objective.reinitialised_parameters(self.step):
            self.optimizer.state.pop(param, None)      # a re-created layer starts without moments
        if not math.isfinite(values["loss"]):
            self._diverged(self.step + 1, f"loss is {values['loss']} ({_format_terms(values)})")
        _average_gradients(self.replicated, self.env)   # FSDP has already averaged the sharded ones
        self.scaler.unscale_(self.optimizer)
        clip = fsdp.clip_gradients if self.sharded else torch.nn.utils.clip_grad_norm_
        grad_norm = clip(self.params, self.cfg.grad_clip or math.inf)
        if not torch.isfinite(grad_norm) and not self.scaler.is_enabled():
            self._diverged(self.step + 1, f"gradient norm is {grad_norm.item()}")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        clamp_logit_scale(self.objective.model)
        self.step += 1
        return values

    def _forward_backward(self, images: torch.Tensor, texts: Optional[torch.Tensor], views=None) -> dict:
        # `views` only when the objective contrasts two views (so objectives without them keep their signature)
        extra = {} if views is None else {"views": views}
        if self.cfg.accum_steps > 1:
            return accumulated_backward(self.objective, images, texts, self.cfg.accum_steps, step=self.step, **extra)
        terms = self.objective(images, texts, step=self.step, **extra)
        self.scaler.scale(terms["loss"]).backward()
        return terms

    def _mean_over_ranks(self, terms: dict) -> dict:
        names = sorted(terms)
        stacked = torch.stack([terms[name].detach().float().reshape(()) for name in names])
        if self.env.is_distributed:
            torch.distributed.all_reduce(stacked)
            stacked /= self.env.world_size
        return dict(zip(names, stacked.tolist()))

    def _diverged(self, step: int, what: str) -> None:
        last = f"last good checkpoint: {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written"
        raise TrainingDiverged(
            f"training diverged at step {step}: {what}; stopped without saving it ({last}). "
            f"Try a lower train.lr, a longer train.warmup or train.grad_clip."
        )

    # ---- the run -----------------------------------------------------------------------
    def fit(self, began: float | None = None) -> TrainResult:
        """Train to `train.steps`. Every record carries `train_wall_s`: seconds since `began`
        (default: now) without the time spent in periodic validation, which val records report
        as `val_s` (what a time-to-accuracy measurement needs)."""
        t = self.cfg
        began = time.perf_counter() if began is None else began
        validation_s = 0.0
        main = self.env.is_main
        if main and self.precision_note:
            sys.stderr.write(self.precision_note + "\n")
        log = MetricsLog(self.output, enabled=main, tensorboard=t.tensorboard, resume_step=self.step)
        bar = progress_bar(t.steps, self.step, enabled=main)
        result = TrainResult(step=self.step, output=self.output, checkpoint=self.last_checkpoint)
        samples_per_step = t.batch_size * self.env.world_size
        timer, window = WindowTimer(), []
        batches = iter(self.loader)
        try:
            while self.step < t.steps:
                started = time.perf_counter()
                batch = next(batches)
                images = batch.images.to(self.device, non_blocking=True)
                texts = _targets(batch)   # token ids, or a fine-tuning loader's class labels
                texts = None if texts is None else texts.to(self.device, non_blocking=True)
                views = getattr(batch, "views", None)   # [2, B, 3, H, W], only when the objective asked
                views = None if views is None else views.to(self.device, non_blocking=True)
                timer.waited(time.perf_counter() - started)
                values = self.train_step(images, texts, views)
                timer.step_done()
                window.append(values)
                result.losses.append(values["loss"])
                bar.update(1)
                if self.step % t.log_every == 0 or self.step == t.steps:
                    record = self._log_record(window, timer.summary(samples_per_step))
                    record["train_wall_s"] = round(time.perf_counter() - began - validation_s, 3)
                    if t.val_every and self.step % t.val_every == 0:
                        validating = time.perf_counter()
                        record.update(self._validate())
                        record["val_s"] = round(time.perf_counter() - validating, 3)
                        validation_s += record["val_s"]
                    log.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.1f}",
                                    lr=f"{record['lr']:.2e}")
                    result.last_log = record
                    timer.reset()
                    window = []
                if (t.save_every and self.step % t.save_every == 0) or self.step == t.steps:
                    self.save()
        finally:
            bar.close()
            log.close()
        result.step, result.checkpoint = self.step, self.last_checkpoint
        return result

    def _log_record(self, window: list, timing: dict) -> dict:
        """One metrics.jsonl line: window means of every loss term, lr, temperature, throughput."""
        terms = {name: sum(v[name] for v in window) / len(window) for name in window[-1]}
        corrupt = self._sum_over_ranks(self.loader.corrupt_count)
        return {
            "step": self.step,
            **terms,
            "lr": self.optimizer.param_groups[0]["lr"],
            "logit_scale": self.objective.model.logit_scale.exp().item(),
            **timing,
            "corrupt_samples": corrupt,
        }

    def _sum_over_ranks(self, value: int) -> int:
        if not self.env.is_distributed:
            return int(value)
        box = torch.tensor([value], dtype=torch.long)
        torch.distributed.all_reduce(box)
        return int(box.item())

    def _validate(self) -> dict:
        """Zero-shot metrics on data.val from rank 0 (prefixed `val/`); {} without an eval package."""
        metrics = {}
        if self.env.is_main and self.validate is not None:
            model = self.objective.model
            model.eval()
            metrics = self.validate(model)
            model.train()
        return {f"val/{name}": value for name, value in metrics.items()}

    # ---- checkpoints -------------------------------------------------------------------
    def save(self) -> None:
        """Write step_{step}.pt from rank 0 (after checking the weights are finite) and update latest."""
        if not self._parameters_finite():
            self._diverged(self.step, "a parameter became NaN/inf")
        rng = gather_objects(self.env, ckpt.rng_state())
        data = gather_objects(self.env, self.loader.state_dict())
        if self.sharded:   # collectives: every rank gathers, rank 0 keeps the full tensors
            model_state, optimizer_state = fsdp.full_model_state(self.objective.model), \
                fsdp.full_optimizer_state(self.objective, self.optimizer)
        path, failure = None, None
        if self.env.is_main:
            state = {
                "model": model_state if self.sharded else self.objective.model.state_dict(),
                "heads": self.objective.heads_state_dict(),
                "config": self.config_record,
                "optimizer": optimizer_state if self.sharded else self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rng,
                "data": data,
                "world_size": self.env.world_size,
                **({"fsdp": True} if self.sharded else {}),
            }
            try:
                path = str(ckpt.save_checkpoint(self.output, self.step, state, keep=self.cfg.keep_checkpoints))
            except UserError as err:
                failure = str(err)
        path, failure = broadcast_object(self.env, (path, failure))  # every rank stops on a failed save
        if failure:
            raise UserError(failure)
        self.last_checkpoint = Path(path)

    def _parameters_finite(self) -> bool:
        """Whether every weight is finite (under FSDP: every rank's shards, agreed over the ranks)."""
        finite = all(torch.isfinite(p.to_local() if fsdp.is_sharded(p) else p).all()
                     for p in self.objective.parameters())
        if not self.sharded:
            return finite
        flag = torch.tensor([float(finite)], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def _resume(self, start: Optional[tuple[Path, dict]]) -> None:
        if start is None:
            return
        path, state = start
        saved_world = state.get("world_size", len(state.get("data", [])))
        if saved_world != self.env.world_size:
            raise UserError(f"{path} was written by {saved_world} process(es); resume it with the same number "
                            f"(now {self.env.world_size})")
        fsdp.check_resume(path, state, self.sharded)
        if self.sharded:
            fsdp.load_full_model_state(self.objective.model, state["model"])
        else:
            self.objective.model.load_state_dict(state["model"])
        self.objective.load_heads_state_dict(state.get("heads", {}))
        if self.sharded:
            fsdp.load_full_optimizer_state(self.objective, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.loader.load_state_dict(state["data"][self.env.rank])
        ckpt.set_rng_state(state["rng"][self.env.rank])
        self.step = int(state["step"])
        self.last_checkpoint = path
        if self.env.is_main:
            sys.stderr.write(f"mmssl: resuming from {path} at step {self.step}\n")


def _channels_last_conv_tower(model: torch.nn.Module) -> bool:
    """Store a convolutional image tower's (ResNet's) 4-D weights channels-last (NHWC).

    oneDNN then runs its convolutions, their backward and the batch norms in NHWC, ~10% faster per
    ResNet step on CPU (docs/benchmarks.md#time-to-accuracy); inputs need no conversion, the
    weights' layout decides. ViT towers (one patch convolution) are left as they are. Returns
    whether the tower was converted.
    """
    convs = [m for m in model.visual.modules() if isinstance(m, torch.nn.Conv2d)]
    if len(convs) < 2:
        return False
    model.visual.to(memory_format=torch.channels_last)
    return True


def _compile_towers(model: torch.nn.Module) -> None:
    """torch.compile the image tower and the text transformer in place (state_dict keys stay open_clip's).

    The towers rather than `model.forward`: the objective calls `encode_image` and the trimmed text
    path (`mmssl.models.text_trim`) directly, which would bypass a compiled forward.
    """
    text = getattr(model, "text", model)
    for tower in (model.visual, getattr(text, "transformer", text)):
        tower.compile()


def _format_terms(values: dict) -> str:
    return ", ".join(f"{name}={value:.4g}" for name, value in values.items() if name != "loss")


def _broadcast_parameters(module: torch.nn.Module, env: DistEnv) -> None:
    """Start every rank from rank 0's weights and buffers (what DDP does at construction); FSDP's
    shards differ by rank by design (they were cut from rank 0's weights, `Trainer.__init__`)."""
    if not env.is_distributed:
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        if not fsdp.is_sharded(tensor):
            torch.distributed.broadcast(tensor.data, src=0)


def _targets(batch) -> Optional[torch.Tensor]:
    labels = getattr(batch, "labels", None)
    return batch.texts if labels is None else labels


def _average_gradients(params: list, env: DistEnv) -> None:
    """Mean of every gradient over ranks, in one all-reduce (a gradient missing on some ranks counts
    as zeros there; one missing on every rank stays None, so the optimizer skips that parameter as it
    would in one process, e.g. the tower during LP-FT's head-only steps)."""
    if not env.is_distributed or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    present = torch.tensor([float(p.grad is not None) for p in params])
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [present.to(grads[0].device)])
    torch.distributed.all_reduce(flat)
    flat /= env.world_size
    chunks = torch.split(flat, [g.numel() for g in grads] + [len(params)])
    for param, chunk, seen in zip(params, chunks[:-1], chunks[-1].tolist()):
        param.grad = chunk.view_as(param).to(param.dtype) if seen > 0 else None
