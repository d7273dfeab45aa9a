"""The fine-tuning objective: the image tower plus a class head, in the shape the training loop runs.

`FinetuneObjective` has what `mmssl.train.loop.Trainer` and exact-batch accumulation
(`mmssl.train.accumulate`) call on an objective (`.model`, `forward`, `draw`, `encode`,
`batch_feature_keys`, `batch_terms`, `aux_terms`, `total`, `end_step`, `heads_state_dict`), with the
batch's class labels where an image-text objective gets token ids. Two objectives:

* `ce` (WiSE-FT's fine-tuning): cross-entropy of `ClassHead` on the normalised image features. The
  head starts as the zero-shot classifier (class-prompt text embeddings x the logit scale), so
  before any step it predicts exactly what zero-shot classification predicts. The text tower and
  logit scale are frozen. `lp_steps` > 0 is LP-FT: those first steps train the head alone.
  Cross-entropy is additive over rows, so it is an auxiliary term (a micro-batch adds its rows'
  share of the batch mean) and accumulation is exact.
* `contrastive` (FLYP): both towers keep contrasting each image with a prompt of its class (one
  template drawn per row and step), `mmssl.losses.class_contrastive_loss`, a batch term over the
  gathered batch. Its head is derived: the fine-tuned text tower's zero-shot classifier, computed
  when a checkpoint is written.

Either way the checkpoint's `heads["classifier"]` is a `ClassHead` state dict, which `mmssl eval
classify` and `mmssl eval zeroshot` apply.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmssl.errors import UserError
from mmssl.losses import ClipLoss, class_contrastive_loss
from mmssl.models.text_trim import encode_text
from mmssl.train.policy import autocast

HEAD = "classifier"
ZEROSHOT_HEAD = "zeroshot_classifier"


class ClassHead(nn.Linear):
    """Logits = W · normalise(image features) + b; W starts as the zero-shot class vectors x scale."""

    def __init__(self, embed_dim: int, num_classes: int):
        super().__init__(embed_dim, num_classes)

    @classmethod
    def zero_shot(cls, class_vectors: torch.Tensor, logit_scale: float) -> "ClassHead":
        """From [embed_dim, num_classes] unit class vectors (`eval.zeroshot.build_classifier`)."""
        head = cls(*class_vectors.shape)
        with torch.no_grad():
            head.weight.copy_(class_vectors.T * logit_scale)
            head.bias.zero_()
        return head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return super().forward(F.normalize(features.float(), dim=-1))


@dataclass
class LabelDraw:
    """One step's labels and (FLYP) the prompt row of each; `rows` is a micro-batch's share."""

    batch_size: int
    labels: torch.Tensor
    prompts: Optional[torch.Tensor] = None     # [B] index into the objective's prompt token table

    def rows(self, start: int, stop: int) -> "LabelDraw":
        prompts = None if self.prompts is None else self.prompts[start:stop]
        return LabelDraw(self.batch_size, self.labels[start:stop], prompts)


class FinetuneObjective(nn.Module):
    """`forward(images, labels, step)` -> {"loss", "ce_loss" | "contrastive_loss"}."""

    def __init__(self, model: nn.Module, class_vectors: torch.Tensor, finetune_cfg, *,
                 prompt_tokens: Optional[torch.Tensor] = None, templates: Sequence = (), precision: str = "fp32",
                 rank: int = 0, world_size: int = 1):
        super().__init__()
        self.model = model
        self.objective = finetune_cfg.objective
        self.num_classes = class_vectors.shape[1]
        self.label_smoothing = finetune_cfg.label_smoothing
        self.lp_steps = finetune_cfg.lp_steps
        self.precision = precision
        self.rank, self.world_size = rank, world_size
        scale = float(model.logit_scale.detach().exp())
        self.head = ClassHead.zero_shot(class_vectors, scale)
        # kept in every checkpoint: the alpha = 0 head of WiSE-FT (mmssl.finetune.wise)
        self.zeroshot_head = {key: value.detach().clone() for key, value in self.head.state_dict().items()}
        if self.objective == "ce":
            for name, param in model.named_parameters():
                if not name.startswith("visual."):
                    param.requires_grad_(False)    # the text tower and temperature are not what CE trains
            self.term = "ce_loss"
        else:
            if prompt_tokens is None or prompt_tokens.shape[0] != self.num_classes * len(templates):
                raise ValueError("the contrastive objective needs the token rows of every class x template prompt")
            self.head.requires_grad_(False)        # derived from the text tower when saved
            self.register_buffer("prompt_tokens", prompt_tokens, persistent=False)
            self.num_templates = len(templates)
            self.contrast = ClipLoss(gather_with_grad=True, rank=rank, world_size=world_size)
            self.term = "contrastive_loss"

    # ---- the pieces accumulation calls ---------------------------------------------------
    def draw(self, images: torch.Tensor, labels: torch.Tensor, step: Optional[int] = None) -> LabelDraw:
        self._check_labels(labels)
        self.head_only = self.objective == "ce" and step is not None and step < self.lp_steps
        prompts = None
        if self.objective == "contrastive":   # a template per row, from the torch RNG (saved for resume)
            templates = torch.randint(self.num_templates, (labels.shape[0],)).to(labels.device)
            prompts = labels * self.num_templates + templates
        return LabelDraw(images.shape[0], labels, prompts)

    def encode(self, images: torch.Tensor, labels: torch.Tensor, draws: LabelDraw, views=None) -> dict:
        with autocast(self.precision, images.device):
            if self.objective == "ce":
                with torch.set_grad_enabled(torch.is_grad_enabled() and not self.head_only):
                    return {"image_features": self.model.encode_image(images)}
            tokens = self.prompt_tokens[draws.prompts]
            return {"image_features": F.normalize(self.model.encode_image(images), dim=-1),
                    "text_features": encode_text(self.model, tokens, normalize=True),
                    "logit_scale": self.model.logit_scale.exp()}

    @property
    def batch_feature_keys(self) -> tuple:
        return () if self.objective == "ce" else ("image_features", "text_features")

    def batch_terms(self, outputs: dict, draws: LabelDraw) -> dict:
        if self.objective == "ce":
            return {}
        per_image, per_text = self.contrast.logits(outputs["image_features"].float(),
                                                   outputs["text_features"].float(), outputs["logit_scale"])
        return {self.term: class_contrastive_loss(per_image, per_text, self._global_labels(draws.labels))}

    def aux_terms(self, images: torch.Tensor, labels: torch.Tensor, outputs: dict, draws: LabelDraw) -> dict:
        if self.objective != "ce":
            return {}
        logits = self.head(outputs["image_features"])
        summed = F.cross_entropy(logits, draws.labels, label_smoothing=self.label_smoothing, reduction="sum")
        return {self.term: summed / draws.batch_size}   # this micro-batch's share of the batch mean

    uncertainty = None                 # one term: no learned weights (mmssl.objective.UncertaintyWeights)

    def total(self, terms: dict, penalty: bool = True) -> torch.Tensor:
        if self.term in terms:
            return terms[self.term].float()
        return torch.zeros((), requires_grad=True)   # nothing in this part (CE has no batch term)

    def logged_weights(self) -> dict:
        return {}

    def reinitialised_parameters(self, step: int) -> list:
        return []                      # no head is re-created during fine-tuning

    def end_step(self, draws: LabelDraw) -> None:
        pass

    def forward(self, images: torch.Tensor, labels: torch.Tensor, step: Optional[int] = None, views=None) -> dict:
        draws = self.draw(images, labels, step)
        outputs = self.encode(images, labels, draws)
        terms = {**self.batch_terms(outputs, draws), **self.aux_terms(images, labels, outputs, draws)}
        terms["loss"] = self.total(terms)
        return terms

    # ---- checkpoints -----------------------------------------------------------------------
    def heads_state_dict(self) -> dict:
        if self.objective == "contrastive":
            self._derive_head()
        return {HEAD: self.head.state_dict(), ZEROSHOT_HEAD: self.zeroshot_head}

    def load_heads_state_dict(self, state: dict) -> None:
        if HEAD in state:
            self.head.load_state_dict(state[HEAD])

    def _derive_head(self) -> None:
        """FLYP's classifier: the fine-tuned text tower's class vectors (mean over templates) x scale."""
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            rows = [encode_text(self.model, chunk, normalize=True).float()
                    for chunk in self.prompt_tokens.split(256)]
            per_prompt = torch.cat(rows).view(self.num_classes, self.num_templates, -1)
            vectors = F.normalize(F.normalize(per_prompt, dim=-1).mean(dim=1), dim=-1)
            self.head.weight.copy_(vectors * self.model.logit_scale.exp())
            self.head.bias.zero_()
        self.model.train(was_training)

    # ---- helpers ---------------------------------------------------------------------------
    def _check_labels(self, labels: torch.Tensor) -> None:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= self.num_classes:
            bad = low if low < 0 else high
            raise UserError(f"training label {bad} is out of range for the {self.num_classes} classes of the "
                            f"head (check the class names against the training data)")

    def _global_labels(self, labels: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return labels
        parts = [torch.empty_like(labels) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, labels)
        return torch.cat(parts)
