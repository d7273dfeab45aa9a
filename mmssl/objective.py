"""The training objective: the one place that knows the loss terms, their weights, their precision and the total.

    loss = contrastive_loss + sum over enabled terms t of  loss.<t>_weight * t

`Objective` holds the dual encoder (`.model`), the heads of the enabled terms (`.heads`) and the
contrastive loss (CLIP's InfoNCE or SigLIP's sigmoid loss, `loss.kind`). Its forward returns every
term unweighted plus the weighted total under "loss", so the loop can log each one and
back-propagate the total.

Adding a term is one `Term` in `TERMS` (its logged name, the `LossConfig` weight field that turns
it on, the head it trains, how to draw its random masks, how to compute it) plus the weight field
in `mmssl.config.LossConfig`. A term with weight 0 is never built: no head, no parameters, no
forward pass. Total, logging, checkpoints and gradient accumulation pick a new term up unchanged.

Two rules keep accumulation over micro-batches exact (`mmssl.train.accumulate`):
* random draws (MLM token masks, inpainting patch masks) are made once per step for the whole batch
  (`draw`) and sliced per micro-batch (`Draws.rows`);
* every auxiliary term is additive over micro-batches: a micro-batch's value is its rows' share of
  the whole batch's mean (normalised by the whole batch's count, e.g. `Draws.batch_size`);
* or it is a batch term (`Term.features`, e.g. SimCLR's NT-Xent): `encode` adds its per-row
  features, `batch_terms` computes it on the whole batch's features, and accumulation caches
  them like the contrastive features, so it is exact without being additive.

SimCLR: `loss.simclr_weight` adds NT-Xent on two augmented views of each image (SLIP); the
loader yields the views (`views`, [2, B, 3, H, W]) only when `needs_views`. `loss.kind=simclr`
trains the image tower alone (`image_only`): no captions, no contrastive image-text term, the
text tower and logit_scale frozen at their init, the SimCLR term at weight 1.

Precision: the towers and heads run under the run's autocast; the contrastive loss and the total run
in fp32 (`mmssl.train.policy`).

Inpainting modes: `separate` gives the masked image its own encoder pass; `shared` (FLIP) encodes
only the visible patches once and feeds that to both the contrastive loss and the decoder. In shared
mode the last `heads.inpaint.unmasked_tune_steps` steps see full images (FLIP's unmasked tuning),
so the inpainting term is absent from those steps.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmssl.config import IMAGE_ONLY_KINDS, PRETEXT_KINDS
from mmssl.errors import UserError
from mmssl.heads import InpaintHead, MLMHead
from mmssl.heads.caption import CaptionDraw, CaptionHead
from mmssl.heads.coca import CoCaDecoderHead
from mmssl.heads.itm import ITMHead, draw_itm
from mmssl.heads.moco import MoCoHead
from mmssl.heads.momentum import MomentumTowers, momentum_of
from mmssl.heads.simclr import SimCLRHead
from mmssl.heads.vit_tokens import encode_visible
from mmssl.losses import ClipLoss, SigLipLoss, SimCLRLoss, queue_contrastive_loss, moco_loss
from mmssl.models.text_trim import encode_text
from mmssl.models.tower_tokens import image_tokens, is_coca, text_tokens, text_valid
from mmssl.train.policy import autocast


@dataclass
class Draws:
    """One step's random draws for the whole batch; `rows(start, stop)` is a micro-batch's share.
    With the momentum queue on, also the step's momentum keys (whole-batch constants)."""

    batch_size: int                              # rows in the step's batch: normaliser of per-row means
    masks: dict = field(default_factory=dict)    # term name -> draw with .rows(start, stop)
    keys: Optional["MomentumKeys"] = None
    enqueue: dict = field(default_factory=dict)  # head name -> global keys for its queue after the step

    def rows(self, start: int, stop: int) -> "Draws":
        return Draws(self.batch_size, {name: mask.rows(start, stop) for name, mask in self.masks.items()},
                     self.keys, self.enqueue)


@dataclass
class MomentumKeys:
    """The momentum towers' keys of the global batch, and where this rank's rows start in it."""

    images: torch.Tensor
    texts: torch.Tensor
    offset: int


@dataclass(frozen=True)
class Term:
    """One auxiliary loss term: name logged, weight field, head, random draw, computation."""

    name: str                                    # logged key, e.g. "mlm_loss"
    weight: Optional[str]                        # LossConfig field; 0 = term and head never built (None: only
                                                 # as the whole loss of its `kinds`)
    head: str                                    # key in Objective.heads and the checkpoint's `heads`
    build_head: Callable                         # (model, experiment config, heads resolved) -> nn.Module
    compute: Callable                            # (objective, images, texts, outputs, draws) -> tensor | None
    draw: Optional[Callable] = None              # (objective, images, texts, step) -> draw | None
    # A batch term (not additive over micro-batches, like NT-Xent) names the per-row features it adds
    # to `encode`'s outputs; its `compute` then sees the whole batch's features, and gradient
    # accumulation caches them like the contrastive features (GradCache), so it stays exact.
    feature_keys: tuple = ()
    features: Optional[Callable] = None          # (objective, views) -> {key: [rows, D]}
    kinds: tuple = ()                            # loss kinds in which this term is the whole loss (weight 1)
    pair_tokens: bool = False                    # reads both towers' token states ("image_tokens",
                                                 # "text_tokens") from the image-text pass

    @property
    def is_batch_term(self) -> bool:
        return bool(self.feature_keys)


def _draw_mlm(objective, images, texts, step):
    return objective.heads["mlm"].mask(objective.model, texts)


def _mlm(objective, images, texts, outputs, draws):
    return objective.heads["mlm"](objective.model, texts, draws.masks["mlm_loss"])


def _draw_patches(objective, images, texts, step):
    if objective.shared_masking and step is not None and step >= objective.unmasked_from_step:
        return None  # FLIP's unmasked tuning: full images, nothing to reconstruct
    return objective.heads["inpaint"].sample_mask(objective.model, images)


def _inpaint(objective, images, texts, outputs, draws):
    mask = draws.masks.get("inpaint_loss")
    if mask is None:
        return None
    head = objective.heads["inpaint"]
    if "visible" in outputs:
        return head.reconstruction_loss(images, outputs["visible"], mask)
    return head(objective.model, images, mask)


def _simclr_projections(objective, views):
    head = objective.heads["simclr"]
    return {"simclr_z1": head(objective.model, views[0]), "simclr_z2": head(objective.model, views[1])}


def _simclr(objective, images, texts, outputs, draws):
    loss = SimCLRLoss(objective.simclr_temperature, objective.rank, objective.world_size)
    return loss(outputs["simclr_z1"].float(), outputs["simclr_z2"].float())


def _draw_moco(objective, images, texts, step):
    objective.heads["moco"].momentum_update(objective.model)   # once per step, before any key
    return None


def _moco_features(objective, views):
    return objective.heads["moco"].queries_and_keys(objective.model, views)


def _moco(objective, images, texts, outputs, draws):
    head = objective.heads["moco"]
    keys = outputs["moco_k"].detach()
    if objective.world_size > 1:
        keys = _gather_constants(keys, objective.world_size)
    draws.enqueue["moco"] = keys            # joins the queue after the step (`end_step`)
    own = keys[objective.rank * outputs["moco_q"].shape[0]:][:outputs["moco_q"].shape[0]]
    return moco_loss(outputs["moco_q"].float(), own, head.momentum.negatives()[0], head.temperature)


def _draw_itm(objective, images, texts, step):
    return draw_itm(texts, text_valid(objective.model, texts))


def _itm(objective, images, texts, outputs, draws):
    with torch.no_grad():
        logits_per_image = outputs["logit_scale"] * outputs["image_features"] @ outputs["text_features"].t()
    with autocast(objective.precision, outputs["image_tokens"].device):
        return objective.heads["itm"].loss(outputs["image_tokens"], outputs["text_tokens"], logits_per_image,
                                           draws.masks["itm_loss"])


def _draw_caption(objective, images, texts, step):
    return CaptionDraw(texts)


def _caption(objective, images, texts, outputs, draws):
    with autocast(objective.precision, outputs["image_tokens"].device):
        return objective.heads["caption"].loss(objective.model, outputs["image_tokens"], outputs["text_tokens"],
                                               draws.masks["caption_loss"].tokens)


def _build_pretext(head: str):
    """The head of a pretext task, from its module `mmssl.heads.<head>` (class `PRETEXT_HEAD`)."""
    def build(model, cfg, heads):
        import importlib

        module = importlib.import_module(f"mmssl.heads.{head}")
        return module.PRETEXT_HEAD(model, getattr(heads, head))
    return build


def _pretext_draw(head: str):
    def draw(objective, images, texts, step):
        return objective.heads[head].draw(objective.model, images, step)
    return draw


def _pretext_loss(head: str, name: str):
    def compute(objective, images, texts, outputs, draws):
        return objective.heads[head].loss(objective.model, images, draws.masks.get(name), draws.batch_size)
    return compute


def _pretext_term(head: str) -> "Term":
    """A classic pretext task: an image-only head with the pretext protocol (mmssl.heads.pretext)."""
    name = f"{head}_loss"
    return Term(name, f"{head}_weight", head, _build_pretext(head), _pretext_loss(head, name), _pretext_draw(head),
                kinds=(head,))


TERMS = (
    Term("mlm_loss", "mlm_weight", "mlm", lambda model, cfg, heads: MLMHead(model, heads.mlm), _mlm, _draw_mlm),
    Term("inpaint_loss", "inpaint_weight", "inpaint",
         lambda model, cfg, heads: InpaintHead(model, heads.inpaint), _inpaint, _draw_patches, kinds=("mae",)),
    Term("simclr_loss", "simclr_weight", "simclr", lambda model, cfg, heads: SimCLRHead(model, heads.simclr),
         _simclr, feature_keys=("simclr_z1", "simclr_z2"), features=_simclr_projections, kinds=("simclr",)),
    Term("moco_loss", None, "moco", lambda model, cfg, heads: MoCoHead(model, heads.simclr, cfg.loss), _moco,
         _draw_moco, feature_keys=("moco_q", "moco_k"), features=_moco_features, kinds=("moco",)),
    Term("itm_loss", "itm_weight", "itm", lambda model, cfg, heads: ITMHead(model, heads.itm), _itm, _draw_itm,
         feature_keys=("image_tokens", "text_tokens"), pair_tokens=True),
    Term("caption_loss", "caption_weight", "caption", lambda model, cfg, heads: _caption_head(model, heads),
         _caption, _draw_caption, feature_keys=("image_tokens", "text_tokens"), pair_tokens=True),
    *(_pretext_term(head) for head in PRETEXT_KINDS),
)


def _caption_head(model, heads) -> nn.Module:
    """A CoCa model's own text decoder (a head without parameters), else mmssl's caption decoder."""
    return CoCaDecoderHead(model) if is_coca(model) else CaptionHead(model, heads.caption)


def term_weight(loss_cfg, term: Term) -> float:
    """The term's weight: 1 where it is the whole loss (`loss.kind`), else `loss.<term>_weight`."""
    if loss_cfg.kind in term.kinds:
        return 1.0
    return float(getattr(loss_cfg, term.weight)) if term.weight else 0.0


# round-2 objectives that are implemented (the rest are refused, not ignored)
BUILT: tuple = ("loss.queue_size", "loss.distill_alpha", "loss.simclr_weight", "loss.kind=simclr", "loss.kind=moco")


def build_contrastive_loss(loss_cfg, rank: int = 0, world_size: int = 1) -> nn.Module:
    """ClipLoss or SigLipLoss for the `loss` config section (already validated)."""
    if loss_cfg.kind == "siglip":
        return SigLipLoss(cache_labels=True, rank=rank, world_size=world_size)
    return ClipLoss(local_loss=loss_cfg.local_loss, gather_with_grad=loss_cfg.gather_with_grad,
                    cache_labels=True, rank=rank, world_size=world_size)


class Objective(nn.Module):
    """Dual encoder + heads + contrastive loss; `forward(images, texts, step, views)` -> dict of terms.

    `cfg` is the experiment config: its `loss` and `heads` sections and `train.steps` (for FLIP's
    unmasked tuning). `precision` is a resolved name from `mmssl.train.policy` (fp32 | bf16 | fp16).
    """

    def __init__(self, model: nn.Module, cfg, rank: int = 0, world_size: int = 1, precision: str = "fp32"):
        super().__init__()
        unbuilt = [what for what, asked in (("loss.kind=simclr", cfg.loss.kind == "simclr"),
                                             ("loss.kind=moco", cfg.loss.kind == "moco"),
                                             ("loss.simclr_weight", cfg.loss.simclr_weight > 0),
                                             ("loss.queue_size", cfg.loss.queue_size > 0),
                                             ("loss.distill_alpha", cfg.loss.distill_alpha > 0))
                   if asked and what not in BUILT]
        if unbuilt:
            raise UserError(f"{unbuilt[0]} is not available yet (issue 12 is in progress)")
        if is_coca(model):
            _check_coca(cfg)
        self.model = model
        self.precision = precision
        self.image_only = cfg.loss.kind in IMAGE_ONLY_KINDS   # the image tower alone: no captions, no text tower
        if self.image_only:
            _check_image_only(cfg)
            for name, param in model.named_parameters():
                if not name.startswith("visual."):
                    param.requires_grad_(False)   # text tower and logit_scale stay at their init, untrained
        self.terms = [term for term in TERMS if term_weight(cfg.loss, term) > 0]
        self.weights = {term.name: term_weight(cfg.loss, term) for term in self.terms}
        self.needs_views = any(term.features is not None for term in self.terms)
        self.needs_tokens = any(term.pair_tokens for term in self.terms)
        self.simclr_temperature = cfg.loss.simclr_temperature
        heads = _resolve_heads(cfg)
        self.heads = nn.ModuleDict({term.head: term.build_head(model, cfg, heads) for term in self.terms})
        if cfg.loss.weighting == "uncertainty":
            names = ([] if self.image_only else ["contrastive_loss"]) + [term.name for term in self.terms]
            if len(names) < 2:
                raise UserError("loss.weighting=uncertainty weighs several terms against each other; this "
                                "objective has one: turn on a second term or use loss.weighting=fixed")
            self.heads["weighting"] = UncertaintyWeights(names)
        self.contrastive = build_contrastive_loss(cfg.loss, rank, world_size)
        self.siglip = cfg.loss.kind == "siglip"
        if self.siglip and getattr(model, "logit_bias", None) is None:
            raise UserError("loss.kind=siglip needs a model with logit_bias: create_model(..., siglip=True)")
        self.shared_masking = "inpaint" in self.heads and cfg.heads.inpaint.mode == "shared"
        if self.shared_masking and not isinstance(getattr(model.visual, "patch_dropout", nn.Identity()), nn.Identity):
            raise UserError("heads.inpaint.mode=shared already drops the masked patches from the contrastive "
                            "branch; set model.patch_dropout=0")
        self.unmasked_from_step = cfg.train.steps - cfg.heads.inpaint.unmasked_tune_steps
        self.rank, self.world_size = rank, world_size
        self.distill_alpha = cfg.loss.distill_alpha
        if cfg.loss.distill_alpha > 0 and cfg.loss.queue_size == 0:
            raise UserError("loss.distill_alpha needs the momentum model: set loss.queue_size > 0")
        if cfg.loss.queue_size > 0 and cfg.loss.kind != "moco":     # moco's queue lives in its head
            if cfg.loss.kind != "clip":
                raise UserError(f"loss.queue_size works with loss.kind=clip (ALBEF's queue) or moco, "
                                f"not {cfg.loss.kind}")
            if self.shared_masking:
                raise UserError("loss.queue_size with heads.inpaint.mode=shared is not supported: the keys would "
                                "see full images while the queries see visible patches; use mode=separate")
            self.heads["momentum"] = MomentumTowers(model, cfg.loss.queue_size, momentum_of(cfg.loss),
                                                    model.visual.output_dim)

    @property
    def momentum(self) -> Optional[MomentumTowers]:
        return self.heads["momentum"] if "momentum" in self.heads else None

    # ---- the pieces (what gradient accumulation calls) ----------------------------------
    def draw(self, images: torch.Tensor, texts: torch.Tensor, step: Optional[int] = None) -> Draws:
        """Every enabled term's random draw for this (0-based) step's whole batch."""
        draws = Draws(batch_size=images.shape[0])
        for term in self.terms:
            mask = term.draw(self, images, texts, step) if term.draw else None
            if mask is not None:
                draws.masks[term.name] = mask
        if self.momentum is not None:
            draws.keys = self._momentum_keys(images, texts)
        return draws

    def _momentum_keys(self, images: torch.Tensor, texts: torch.Tensor) -> MomentumKeys:
        """EMA step of the momentum towers, then their keys of the whole (global) batch."""
        momentum = self.momentum
        momentum.update(self.model)
        with autocast(self.precision, images.device):
            image_keys, text_keys = momentum.keys(images, texts)
        image_keys, text_keys = image_keys.float(), text_keys.float()
        if self.world_size > 1:
            image_keys, text_keys = _gather_constants(image_keys, self.world_size), _gather_constants(text_keys, self.world_size)
        return MomentumKeys(image_keys, text_keys, offset=self.rank * images.shape[0])

    def end_step(self, draws: Draws) -> None:
        """After the step's loss: its keys join the queues (every rank enqueues the same global keys)."""
        if draws.keys is not None:
            self.momentum.enqueue(draws.keys.images, draws.keys.texts)
        for head, keys in draws.enqueue.items():
            self.heads[head].momentum.enqueue(keys)

    def encode(self, images: torch.Tensor, texts: torch.Tensor, draws: Draws, views=None) -> dict:
        """open_clip's output dict for the contrastive loss; in shared mode also the visible patches;
        the batch terms' per-row features of the two `views` ([2, B, 3, H, W]) when they are on.

        Captions are encoded without their padding where that is exact (`mmssl.models.text_trim`).
        """
        outputs = {} if self.image_only else self._encode_pairs(images, texts, draws)
        with autocast(self.precision, images.device):
            for term in self.terms:
                if term.features is not None:
                    outputs.update(term.features(self, views))
        return outputs

    def _encode_pairs(self, images: torch.Tensor, texts: torch.Tensor, draws: Draws) -> dict:
        mask = draws.masks.get("inpaint_loss") if self.shared_masking else None
        with autocast(self.precision, images.device):
            outputs = {"logit_scale": self.model.logit_scale.exp()}
            if self.needs_tokens:
                text = text_tokens(self.model, texts)
                outputs.update(text_features=F.normalize(text.features, dim=-1), text_tokens=text.tokens)
            else:
                outputs["text_features"] = encode_text(self.model, texts, normalize=True)
            if mask is not None:
                visible = encode_visible(self.model.visual, images, mask.keep)
                outputs.update(image_features=F.normalize(visible.features, dim=-1), visible=visible)
                if self.needs_tokens:
                    outputs["image_tokens"] = visible.tokens
            elif self.needs_tokens:
                image = image_tokens(self.model, images)     # the model: a CoCa model's own _encode_image
                outputs.update(image_features=F.normalize(image.features, dim=-1), image_tokens=image.tokens)
            else:
                outputs["image_features"] = self.model.encode_image(images, normalize=True)
        if self.siglip:
            outputs["logit_bias"] = self.model.logit_bias
        return outputs

    def contrastive_loss(self, outputs: dict, draws: Optional[Draws] = None) -> torch.Tensor:
        """The contrastive term of a whole batch's outputs, in fp32 (against the momentum keys and
        queues when the queue is on: `draws` carries the step's keys)."""
        if self.momentum is not None:
            image_queue, text_queue = self.momentum.negatives()
            return queue_contrastive_loss(outputs["image_features"].float(), outputs["text_features"].float(),
                                          draws.keys.images, draws.keys.texts, image_queue, text_queue,
                                          outputs["logit_scale"].float(), draws.keys.offset, self.distill_alpha)
        keys = ("image_features", "text_features", "logit_scale") + (("logit_bias",) if self.siglip else ())
        return self.contrastive(*(outputs[key].float() for key in keys))

    @property
    def batch_feature_keys(self) -> tuple:
        """Per-row outputs that whole-batch terms read (what gradient accumulation caches)."""
        keys = () if self.image_only else ("image_features", "text_features")
        keys += tuple(key for term in self.terms for key in term.feature_keys)
        return tuple(dict.fromkeys(keys))   # once each: ITM and captioning share the pass's tokens

    def batch_terms(self, outputs: dict, draws: Optional[Draws] = None) -> dict:
        """Unweighted whole-batch terms (fp32): the contrastive term (not for image-only kinds) and
        the batch terms of the enabled heads (e.g. "simclr_loss")."""
        values = {} if self.image_only else {"contrastive_loss": self.contrastive_loss(outputs, draws)}
        for term in self.terms:
            if term.is_batch_term:
                values[term.name] = term.compute(self, None, None, outputs, draws).float()
        return values

    def aux_terms(self, images: torch.Tensor, texts: torch.Tensor, outputs: dict, draws: Draws) -> dict:
        """Unweighted auxiliary terms of the enabled heads (fp32), e.g. {"mlm_loss": ..., "inpaint_loss": ...}."""
        values = {}
        with autocast(self.precision, images.device):
            for term in self.terms:
                if term.is_batch_term:
                    continue  # `batch_terms`
                value = term.compute(self, images, texts, outputs, draws)
                if value is not None:
                    values[term.name] = value.float()
        return values

    @property
    def uncertainty(self) -> Optional["UncertaintyWeights"]:
        return self.heads["weighting"] if "weighting" in self.heads else None

    def total(self, terms: dict, penalty: bool = True) -> torch.Tensor:
        """contrastive_loss (weight 1, if present) + each auxiliary term times its weight, in fp32.

        With loss.weighting=uncertainty each weighted term t is scaled by 0.5 exp(-s_t) and, when
        `penalty`, 0.5 s_t is added (`UncertaintyWeights`); gradient accumulation adds the penalty of
        its additive terms once, not once per micro-batch. Logged-only keys ("logvar_*") are skipped.
        """
        losses = {name: value for name, value in terms.items() if not name.startswith(LOGGED_ONLY)}
        unknown = sorted(set(losses) - set(self.weights) - {"contrastive_loss", "loss"})
        if unknown:
            raise KeyError(f"no weight for loss term {unknown[0]!r}: add it to mmssl.objective.TERMS")
        weighted = {"contrastive_loss": losses["contrastive_loss"].float()} if "contrastive_loss" in losses else {}
        weighted.update({name: weight * losses[name] for name, weight in self.weights.items() if name in losses})
        if self.uncertainty is not None:
            return self.uncertainty.total(weighted, penalty=penalty)
        parts = list(weighted.values())
        return sum(parts[1:], parts[0]) if parts else torch.zeros(())

    def reinitialised_parameters(self, step: int) -> list:
        """Parameters a head re-initialised in this (0-based) step's draw, e.g. DeepCluster's classifier
        after a re-clustering: the loop drops their optimizer state, as re-creating them would."""
        return [param for head in self.heads.values() if hasattr(head, "reinitialised_at")
                for param in head.reinitialised_at(step)]

    def logged_weights(self) -> dict:
        """The learned log-variances, logged with the terms ("logvar_<term>"); empty with fixed weights."""
        return {} if self.uncertainty is None else self.uncertainty.logged()

    # ---- one step on a whole batch --------------------------------------------------------
    def forward(self, images: torch.Tensor, texts: torch.Tensor, step: Optional[int] = None, views=None) -> dict:
        draws = self.draw(images, texts, step)
        outputs = self.encode(images, texts, draws, views)
        terms = {**self.batch_terms(outputs, draws), **self.aux_terms(images, texts, outputs, draws)}
        terms["loss"] = self.total(terms)
        terms.update(self.logged_weights())
        self.end_step(draws)
        return terms

    # ---- checkpoints ----------------------------------------------------------------------
    def heads_state_dict(self) -> dict:
        """The checkpoint's `heads` entry: head name -> state dict (empty when no head is on)."""
        return {name: head.state_dict() for name, head in self.heads.items()}

    def load_heads_state_dict(self, state: dict) -> None:
        """Restore the enabled heads from a checkpoint's `heads`; heads absent there keep their init."""
        for name, head in self.heads.items():
            if name in state:
                head.load_state_dict(state[name])


LOGGED_ONLY = "logvar_"   # terms-dict keys that are logged but are not losses


class UncertaintyWeights(nn.Module):
    """Learned homoscedastic-uncertainty weights (Kendall, Gal and Cipolla 2018, arXiv:1705.07115).

    One log-variance s_t = log sigma_t^2 per term, initialised at 0 (every term at its fixed weight):

        total = sum_t 0.5 exp(-s_t) L_t + 0.5 s_t

    (L_t is the term times its fixed weight), so d total / d s_t = 0.5 (1 - exp(-s_t) L_t): a term's
    weight falls where its loss stays high. Saved with the heads (`heads["weighting"]`), never exported.
    """

    def __init__(self, names: list):
        super().__init__()
        self.names = list(names)
        self.log_vars = nn.Parameter(torch.zeros(len(self.names)))

    def total(self, weighted: dict, penalty: bool = True) -> torch.Tensor:
        parts = [0.5 * torch.exp(-self.log_vars[index]) * weighted[name].float()
                 for index, name in enumerate(self.names) if name in weighted]
        scaled = sum(parts[1:], parts[0]) if parts else torch.zeros(())
        return scaled + self.penalty(weighted) if penalty else scaled

    def penalty(self, names) -> torch.Tensor:
        """0.5 s_t summed over `names` (accumulation adds it once for its additive terms)."""
        picked = [self.log_vars[self.names.index(name)] for name in names if name in self.names]
        return 0.5 * torch.stack(picked).sum() if picked else self.log_vars.sum() * 0.0

    def logged(self) -> dict:
        values = self.log_vars.detach()
        return {f"{LOGGED_ONLY}{name}": values[index] for index, name in enumerate(self.names)}


def _gather_constants(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every rank's rows in rank order, without gradient (keys are constants)."""
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def _resolve_heads(cfg):
    """The heads config with `heads.simclr.input=auto` made concrete: the tower's projected
    embedding for image-only training, SLIP's pooled output beside an image-text loss."""
    simclr = cfg.heads.simclr
    if simclr.input != "auto":
        return cfg.heads
    chosen = "projected" if cfg.loss.kind in IMAGE_ONLY_KINDS else "pooled"
    return dataclasses.replace(cfg.heads, simclr=dataclasses.replace(simclr, input=chosen))


def _check_coca(cfg) -> None:
    """A CoCa model trains contrastive (clip / siglip) plus, with loss.caption_weight > 0, its own decoder."""
    if cfg.loss.kind not in ("clip", "siglip"):
        raise UserError(f"loss.kind={cfg.loss.kind} is not supported for a CoCa model: use clip or siglip "
                        "(plus loss.caption_weight for its decoder)")
    for option, value in (("loss.mlm_weight", cfg.loss.mlm_weight), ("loss.itm_weight", cfg.loss.itm_weight),
                          ("loss.inpaint_weight", cfg.loss.inpaint_weight),
                          ("loss.simclr_weight", cfg.loss.simclr_weight), ("loss.queue_size", cfg.loss.queue_size),
                          ("loss.distill_alpha", cfg.loss.distill_alpha),
                          *((f"loss.{kind}_weight", getattr(cfg.loss, f"{kind}_weight")) for kind in PRETEXT_KINDS)):
        if value > 0:
            raise UserError(f"{option} is not supported for a CoCa model (its towers feed its own decoder): "
                            f"use a CLIP model, or train the CoCa with loss.caption_weight alone")


def _check_image_only(cfg) -> None:
    """loss.kind=simclr|moco|mae|<pretext> trains the image tower alone: refuse the settings that need captions."""
    kind = cfg.loss.kind
    if cfg.loss.simclr_weight > 0:
        raise UserError(f"loss.simclr_weight adds SimCLR to an image-text loss; with loss.kind={kind} "
                        f"{'SimCLR is the whole loss' if kind == 'simclr' else 'MoCo is the loss'}: leave "
                        "loss.simclr_weight at 0")
    for weight in ("mlm_weight", "itm_weight", "caption_weight"):
        if getattr(cfg.loss, weight) > 0:
            raise UserError(f"loss.{weight} needs captions; loss.kind={kind} trains the image tower alone")
    if cfg.loss.distill_alpha > 0 or cfg.loss.queue_size > 0 and kind != "moco":
        raise UserError(f"loss.distill_alpha and loss.queue_size (but moco's) are image-text options; "
                        f"loss.kind={kind} trains the image tower alone")
    if kind in PRETEXT_KINDS and getattr(cfg.loss, f"{kind}_weight") > 0:
        raise UserError(f"loss.kind={kind} makes the {kind} term the loss (weight 1): leave loss.{kind}_weight at 0 "
                        "(the other pretext weights add terms to it)")
    if kind == "mae" and (cfg.loss.inpaint_weight > 0 or cfg.heads.inpaint.mode == "shared"):
        raise UserError("loss.kind=mae is inpainting alone (weight 1, its own encoder pass): leave "
                        "loss.inpaint_weight at 0 and heads.inpaint.mode at separate")
