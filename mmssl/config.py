"""Experiment configuration: YAML files checked against a dataclass schema.

Why a schema: a typo in a key (`train.setps`) must fail loudly instead of being ignored. Every
section is a dataclass; `load_config` reads YAML, applies `a.b=value` overrides from the command
line, and rejects unknown keys and values of the wrong type with a `UserError` naming the key.
Each section also checks its own values when it is built (`__post_init__`: "bad value for
train.lr: -1 (must be a positive number)"), so code that receives a section can trust it.
Sections owned by other modules (model, data, loss, heads, train) are declared here so one file
shows the whole surface a user can set.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

import mmssl.configs
from mmssl.errors import UserError

# the installed `mmssl.configs` package: the repo's configs/ in an editable install, mmssl/configs in a wheel
BUNDLED_DIR = Path(mmssl.configs.__file__).resolve().parent

PRETEXT_KINDS = ("rotation", "jigsaw", "colorize", "deepcluster")   # the classic pretext tasks (mmssl.heads.pretext)
IMAGE_ONLY_KINDS = ("simclr", "moco", "mae") + PRETEXT_KINDS      # the image tower alone: no trained text tower
LOSS_KINDS = ("clip", "siglip") + IMAGE_ONLY_KINDS
WEIGHTINGS = ("fixed", "uncertainty")
JIGSAW_TILES = ("auto", "tokens", "crops")
COLORIZE_TARGETS = ("ab", "rgb")
INPAINT_MODES = ("separate", "shared")
SIMCLR_INPUTS = ("auto", "pooled", "projected")
OPTIMIZERS = ("adamw", "muon")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
FINETUNE_OBJECTIVES = ("ce", "contrastive")  # what each means, and the device policy: mmssl.train.policy


def check_values(section: str, values, rules) -> None:
    """Raise a UserError naming `section.key` for the first (key, ok, why) rule that fails."""
    for key, ok, why in rules:
        if not ok:
            raise UserError(f"bad value for {section}.{key}: {getattr(values, key)!r} ({why})")


def _finite_positive(value) -> bool:
    return value > 0 and math.isfinite(value)


def one_of(options) -> str:
    """The reason a value outside `options` is refused, as every section words it."""
    return f"must be one of {', '.join(options)}"


@dataclass
class ModelConfig:
    """Which dual encoder to build (see `mmssl.models.factory`)."""

    name: str = "tiny-vit-64"          # open_clip model name, or a model config in configs/models/
    pretrained: Optional[str] = None   # local weights file (open_clip format or mmssl checkpoint)
    hf_text: Optional[str] = None      # local Hugging Face directory used as the text tower
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    grad_checkpointing: bool = False
    patch_dropout: float = 0.0         # FLIP patch dropout for the contrastive branch (ViT only)

    def __post_init__(self):
        check_values("model", self, [
            ("patch_dropout", 0.0 <= self.patch_dropout < 1.0, "must be in [0, 1)"),
            ("lock_image_unlocked_groups", self.lock_image_unlocked_groups >= 0, "must be >= 0"),
            ("lock_text_unlocked_layers", self.lock_text_unlocked_layers >= 0, "must be >= 0"),
        ])


@dataclass
class DataConfig:
    """Where shards come from and how they are read (see `mmssl.data`)."""

    train: Optional[Union[str, list]] = None  # shard folder(s) with manifest.json, or brace patterns
    train_weights: Optional[list] = None      # per-source sampling weights (implies resampled)
    val: Optional[str] = None                 # labelled eval shards for periodic zero-shot eval
    resampled: bool = False
    shuffle_buffer: int = 1000
    workers: int = 2
    augment: bool = False                     # random resized crop instead of resize+center crop
    allow_remote: bool = False                # read http(s)/s3/gs shards (through fsspec; never pipe:)

    def __post_init__(self):
        check_values("data", self, [
            ("shuffle_buffer", self.shuffle_buffer >= 0, "must be >= 0 (0: no shuffling)"),
            ("workers", self.workers >= 0, "must be >= 0 (0: decode in the training process)"),
        ])


@dataclass
class LossConfig:
    """The objective: contrastive (clip or siglip; simclr or moco for the image tower alone) plus
    weighted auxiliary heads, and the momentum queue (MoCo / ALBEF)."""

    kind: str = "clip"            # clip | siglip | simclr | moco | mae
    local_loss: bool = False
    gather_with_grad: bool = False
    mlm_weight: float = 0.0       # one <term>_weight per auxiliary term of mmssl.objective.TERMS; 0 = off
    inpaint_weight: float = 0.0
    simclr_weight: float = 0.0    # SLIP: SimCLR on two views of each image beside the image-text loss
    simclr_temperature: float = 0.1
    queue_size: int = 0           # momentum queue of keys used as extra negatives; 0 = off (moco: 65536)
    momentum: float = 0.0         # EMA of the momentum towers; 0 = the kind's default (clip: ALBEF's
                                  # 0.995, moco: MoCo's 0.999)
    distill_alpha: float = 0.0    # ALBEF momentum distillation: weight of the momentum model's soft targets
    moco_temperature: float = 0.2
    itm_weight: float = 0.0       # image-text matching on hard negatives (ALBEF), fusion head heads.itm
    caption_weight: float = 0.0   # CoCa captioning: next-token cross-entropy of a decoder heads.caption
    rotation_weight: float = 0.0  # RotNet: 4-way classification of the image turned 0/90/180/270 degrees
    jigsaw_weight: float = 0.0    # jigsaw: which of heads.jigsaw.permutations shuffled the 3x3 tiles
    colorize_weight: float = 0.0  # colourization: the colour of each patch from the grayscale image
    deepcluster_weight: float = 0.0  # DeepCluster: predict the k-means cluster of the image's features
    weighting: str = "fixed"      # fixed: the weights above | uncertainty: learned log-variances (Kendall 2018)

    def __post_init__(self):
        weights = [f.name for f in dataclasses.fields(self) if f.name.endswith("_weight")]
        check_values("loss", self, [("kind", self.kind in LOSS_KINDS, one_of(LOSS_KINDS)),
                                    ("weighting", self.weighting in WEIGHTINGS, one_of(WEIGHTINGS))] + [
            (name, getattr(self, name) >= 0 and math.isfinite(getattr(self, name)), "must be >= 0 (0: off)")
            for name in weights] + [
            ("simclr_temperature", _finite_positive(self.simclr_temperature), "must be > 0"),
            ("moco_temperature", _finite_positive(self.moco_temperature), "must be > 0"),
            ("queue_size", isinstance(self.queue_size, int) and self.queue_size >= 0, "must be an integer >= 0 (0: off)"),
            ("momentum", 0.0 <= self.momentum < 1.0, "must be in [0, 1)"),
            ("distill_alpha", 0.0 <= self.distill_alpha <= 1.0, "must be in [0, 1]"),
        ])


@dataclass
class MLMHeadConfig:
    mask_prob: float = 0.15
    replace_mask: float = 0.8
    replace_random: float = 0.1

    def __post_init__(self):
        check_values("heads.mlm", self, [
            ("mask_prob", 0.0 < self.mask_prob < 1.0, "must be in (0, 1)"),
            ("replace_mask", self.replace_mask >= 0, "must be >= 0"),
            ("replace_random", self.replace_random >= 0 and self.replace_mask + self.replace_random <= 1.0,
             "must be >= 0, and replace_mask + replace_random at most 1"),
        ])


@dataclass
class InpaintHeadConfig:
    mode: str = "separate"        # separate | shared (FLIP-style)
    mask_ratio: float = 0.75
    decoder_depth: int = 2
    decoder_width: int = 128
    decoder_heads: int = 4
    norm_pix_loss: bool = True
    unmasked_tune_steps: int = 0  # shared mode: final steps trained on unmasked images

    def __post_init__(self):
        check_values("heads.inpaint", self, [
            ("mode", self.mode in INPAINT_MODES, one_of(INPAINT_MODES)),
            ("mask_ratio", 0.0 < self.mask_ratio < 1.0, "must be in (0, 1)"),
            ("decoder_depth", self.decoder_depth >= 1, "must be >= 1"),
            ("decoder_heads", self.decoder_heads >= 1, "must be >= 1"),
            ("decoder_width", self.decoder_width >= 4 and self.decoder_width % 4 == 0
             and self.decoder_width % self.decoder_heads == 0, "must be a multiple of 4 and of decoder_heads"),
            ("unmasked_tune_steps", self.unmasked_tune_steps >= 0, "must be >= 0"),
        ])


@dataclass
class SimCLRHeadConfig:
    """SLIP's projection MLP (mmssl.heads.simclr); 0 = SLIP's size scaled to the image tower's width."""

    hidden_dim: int = 0           # 0: 16/3 x width (4096 at ViT-B's 768)
    out_dim: int = 0              # 0: width / 3 (256 at ViT-B's 768)
    input: str = "auto"           # pooled | projected | auto (pooled for SLIP, projected for loss.kind=simclr)

    def __post_init__(self):
        check_values("heads.simclr", self, [
            ("input", self.input in SIMCLR_INPUTS, one_of(SIMCLR_INPUTS)),
            ("hidden_dim", isinstance(self.hidden_dim, int) and self.hidden_dim >= 0, "must be an integer >= 0 (0: scaled)"),
            ("out_dim", isinstance(self.out_dim, int) and self.out_dim >= 0, "must be an integer >= 0 (0: scaled)"),
        ])


@dataclass
class ItmHeadConfig:
    """The image-text matching head's fusion encoder (mmssl.heads.itm), at the text tower's width."""

    layers: int = 2
    heads: int = 0                # attention heads; 0: the text tower's

    def __post_init__(self):
        check_values("heads.itm", self, [
            ("layers", isinstance(self.layers, int) and self.layers >= 1, "must be an integer >= 1"),
            ("heads", isinstance(self.heads, int) and self.heads >= 0, "must be an integer >= 0 (0: the text tower's)"),
        ])


@dataclass
class CaptionHeadConfig:
    """CoCa's multimodal decoder (mmssl.heads.caption): causal layers over the text tower's states that
    cross-attend to the image tokens, at the text tower's width."""

    layers: int = 2
    heads: int = 0                # attention heads; 0: the text tower's

    def __post_init__(self):
        check_values("heads.caption", self, [
            ("layers", isinstance(self.layers, int) and self.layers >= 1, "must be an integer >= 1"),
            ("heads", isinstance(self.heads, int) and self.heads >= 0, "must be an integer >= 0 (0: the text tower's)"),
        ])


@dataclass
class RotationHeadConfig:
    """RotNet's classifier (mmssl.heads.rotation) on the image tower's embedding."""

    hidden_dim: int = 256         # one hidden layer (LayerNorm, ReLU); 0: a linear classifier

    def __post_init__(self):
        check_values("heads.rotation", self, [
            ("hidden_dim", isinstance(self.hidden_dim, int) and self.hidden_dim >= 0, "must be an integer >= 0"),
        ])


@dataclass
class JigsawHeadConfig:
    """The jigsaw puzzle (mmssl.heads.jigsaw): 3x3 tiles, a fixed set of maximal-Hamming permutations."""

    permutations: int = 100       # classes: a fixed, seeded set of that many of the 9! orders
    tiles: str = "auto"           # tokens: one ViT pass, patch tokens pooled per tile | crops: each tile
                                  # through the tower (any tower) | auto: tokens where the patch grid splits in 3
    jitter: float = 0.1           # crops: each tile cropped up to this fraction smaller, at a random offset
    hidden_dim: int = 512         # the MLP over the 9 concatenated tile embeddings

    def __post_init__(self):
        check_values("heads.jigsaw", self, [
            ("permutations", isinstance(self.permutations, int) and 2 <= self.permutations <= 1000,
             "must be an integer in [2, 1000]"),
            ("tiles", self.tiles in JIGSAW_TILES, one_of(JIGSAW_TILES)),
            ("jitter", 0.0 <= self.jitter < 0.5, "must be in [0, 0.5)"),
            ("hidden_dim", isinstance(self.hidden_dim, int) and self.hidden_dim >= 1, "must be an integer >= 1"),
        ])


@dataclass
class ColorizeHeadConfig:
    """Colourization (mmssl.heads.colorize): a light decoder from the grayscale image's tokens to colour."""

    target: str = "ab"            # ab: the Lab colour channels (lightness is the input) | rgb
    decoder_depth: int = 1
    decoder_width: int = 128
    decoder_heads: int = 4

    def __post_init__(self):
        check_values("heads.colorize", self, [
            ("target", self.target in COLORIZE_TARGETS, one_of(COLORIZE_TARGETS)),
            ("decoder_depth", isinstance(self.decoder_depth, int) and self.decoder_depth >= 0, "must be an integer >= 0"),
            ("decoder_heads", self.decoder_heads >= 1, "must be >= 1"),
            ("decoder_width", self.decoder_width >= 4 and self.decoder_width % self.decoder_heads == 0,
             "must be >= 4 and a multiple of decoder_heads"),
        ])


@dataclass
class DeepClusterHeadConfig:
    """DeepCluster (mmssl.heads.deepcluster): k-means pseudo-labels of a fixed sample of training images."""

    k: int = 64                   # clusters (the classifier's classes)
    every_steps: int = 50         # re-cluster (and re-initialise the classifier) every N steps, from step 0
    sample: int = 2048            # training images embedded and clustered: the first N of data.train
    pca_dim: int = 32             # PCA-whitened dimension before k-means (0: no PCA)
    niter: int = 20               # k-means iterations

    def __post_init__(self):
        check_values("heads.deepcluster", self, [
            ("k", isinstance(self.k, int) and self.k >= 2, "must be an integer >= 2"),
            ("every_steps", isinstance(self.every_steps, int) and self.every_steps >= 1, "must be an integer >= 1"),
            ("sample", isinstance(self.sample, int) and self.sample >= self.k and self.sample <= 1_000_000,
             "must be an integer in [heads.deepcluster.k, 1000000]"),
            ("pca_dim", isinstance(self.pca_dim, int) and self.pca_dim >= 0, "must be an integer >= 0 (0: no PCA)"),
            ("niter", isinstance(self.niter, int) and self.niter >= 1, "must be an integer >= 1"),
        ])


@dataclass
class HeadsConfig:
    mlm: MLMHeadConfig = field(default_factory=MLMHeadConfig)
    inpaint: InpaintHeadConfig = field(default_factory=InpaintHeadConfig)
    simclr: SimCLRHeadConfig = field(default_factory=SimCLRHeadConfig)
    itm: ItmHeadConfig = field(default_factory=ItmHeadConfig)
    caption: CaptionHeadConfig = field(default_factory=CaptionHeadConfig)
    rotation: RotationHeadConfig = field(default_factory=RotationHeadConfig)
    jigsaw: JigsawHeadConfig = field(default_factory=JigsawHeadConfig)
    colorize: ColorizeHeadConfig = field(default_factory=ColorizeHeadConfig)
    deepcluster: DeepClusterHeadConfig = field(default_factory=DeepClusterHeadConfig)


@dataclass
class TrainConfig:
    """The optimisation loop (see `mmssl.train`)."""

    output: str = "runs/default"
    steps: int = 300
    batch_size: int = 128
    accum_steps: int = 1          # micro-batches per step; the contrastive batch stays exact
    optimizer: str = "adamw"      # adamw | muon (Muon on transformer block matrices, AdamW on the rest)
    lr: float = 1e-3              # AdamW's (with optimizer=muon: for the non-block parameters)
    muon_lr: float = 0.02         # optimizer=muon: the block matrices' lr (same warmup-cosine)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup: int = 30
    grad_clip: Optional[float] = 1.0
    precision: str = "fp32"       # auto | fp32 | bf16 | fp16 (CUDA); auto: bf16 where native, else fp32
    compile: bool = False
    seed: int = 0
    log_every: int = 10
    save_every: int = 100
    val_every: int = 0            # 0: no periodic zero-shot validation
    resume: Optional[str] = None  # "latest" or a checkpoint path
    overwrite: bool = False       # a fresh start may replace a run already in train.output
    keep_checkpoints: int = 0     # keep only the newest N step_*.pt files (0: all)
    tensorboard: bool = False
    threads: int = 0              # torch intra-op threads; 0 keeps torch's default
    fsdp: bool = False            # torchrun: shard the towers' blocks with FSDP2 (mmssl.train.fsdp) instead
                                  # of replicating them; a single process trains unsharded

    def __post_init__(self):
        check_values("train", self, [
            ("steps", self.steps >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("accum_steps", 1 <= self.accum_steps <= self.batch_size, "must be between 1 and train.batch_size"),
            ("optimizer", self.optimizer in OPTIMIZERS, one_of(OPTIMIZERS)),
            ("lr", _finite_positive(self.lr), "must be a positive number"),
            ("muon_lr", _finite_positive(self.muon_lr), "must be a positive number"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("beta1", 0 <= self.beta1 < 1, "must be in [0, 1)"),
            ("beta2", 0 <= self.beta2 < 1, "must be in [0, 1)"),
            ("eps", self.eps > 0, "must be > 0"),
            ("warmup", self.warmup >= 0, "must be >= 0"),
            ("grad_clip", self.grad_clip is None or self.grad_clip > 0, "must be > 0 (or null for no clipping)"),
            ("precision", self.precision in PRECISIONS, one_of(PRECISIONS)),
            ("precision", not (self.precision == "fp16" and self.accum_steps > 1),
             "fp16's loss scaling cannot be combined with train.accum_steps > 1; use bf16"),
            ("log_every", self.log_every >= 1, "must be >= 1"),
            ("save_every", self.save_every >= 0, "must be >= 0 (0: only at the end)"),
            ("keep_checkpoints", self.keep_checkpoints >= 0, "must be >= 0 (0: keep every checkpoint)"),
            ("val_every", self.val_every >= 0, "must be >= 0 (0: no validation)"),
            ("threads", self.threads >= 0, "must be >= 0 (0: torch's default)"),
        ])


@dataclass
class FinetuneConfig:
    """`mmssl finetune` (mmssl.finetune): what the image tower and its class head are trained with.
    `mmssl train` ignores this section."""

    objective: str = "ce"             # ce: cross-entropy of a linear head initialised zero-shot;
                                      # contrastive: FLYP (images against their class prompts, both towers)
    label_smoothing: float = 0.0      # ce only
    lp_steps: int = 0                 # LP-FT: the first N steps train the head alone (ce only)
    classnames: Optional[list] = None  # written by mmssl finetune: the head's classes in label order

    def __post_init__(self):
        check_values("finetune", self, [
            ("objective", self.objective in FINETUNE_OBJECTIVES, one_of(FINETUNE_OBJECTIVES)),
            ("label_smoothing", 0.0 <= self.label_smoothing < 1.0, "must be in [0, 1)"),
            ("lp_steps", isinstance(self.lp_steps, int) and self.lp_steps >= 0, "must be an integer >= 0 (0: off)"),
            ("lp_steps", self.lp_steps == 0 or self.objective == "ce", "LP-FT needs finetune.objective=ce"),
            ("label_smoothing", self.label_smoothing == 0 or self.objective == "ce",
             "label smoothing needs finetune.objective=ce"),
        ])


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def __post_init__(self):
        if self.train.val_every and not self.data.val:
            raise UserError("train.val_every needs data.val (labelled shards for zero-shot validation)")
        if self.train.val_every and self.loss.kind in IMAGE_ONLY_KINDS:
            raise UserError(f"train.val_every runs zero-shot validation, which needs a text tower; "
                            f"loss.kind={self.loss.kind} trains the image tower alone: set train.val_every=0")
        tune = self.heads.inpaint.unmasked_tune_steps
        if self.loss.inpaint_weight > 0 and self.heads.inpaint.mode == "shared" and tune > self.train.steps:
            raise UserError(f"bad value for heads.inpaint.unmasked_tune_steps: {tune} (must be at most train.steps)")


def resolve_config_path(path: str | Path) -> Path:
    """A config file as given, or one bundled in configs/ (`tiny.yaml` or just `tiny`)."""
    candidates = [Path(path), BUNDLED_DIR / str(path), BUNDLED_DIR / f"{path}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UserError(f"config file not found: {path}")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> ExperimentConfig:
    """Read a YAML config (or defaults when path is None) and apply `a.b=value` overrides."""
    raw: dict = {}
    if path is not None:
        file = resolve_config_path(path)
        try:
            raw = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"{file}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise UserError(f"{file}: top level must be a mapping of sections")
    for item in overrides:
        _apply_override(raw, item)
    return from_dict(ExperimentConfig, raw)


def _apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise UserError(f"override must look like section.key=value, got {item!r}")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override {key}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(value) if value.strip() else None


def from_dict(cls, data: Any, where: str = ""):
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"config section {where or 'root'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise UserError(f"unknown config key: {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    values = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        values[name] = _coerce(hints[name], value, key)
    return cls(**values)


def _coerce(hint, value, key):
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key)
            except UserError:
                continue
        raise UserError(f"bad value for {key}: {value!r}")
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _is_float(value):
        return float(value)  # YAML 1.1 reads exponent-only numbers such as 1e-4 as strings
    if hint in (int, str, bool, list, dict) and type(value) is hint:
        return value
    if hint is list and isinstance(value, tuple):
        return list(value)
    raise UserError(f"bad value for {key}: {value!r} (expected {getattr(hint, '__name__', hint)})")


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def to_dict(config) -> dict:
    """Plain nested dict of a config (for checkpoints and metrics)."""
    return dataclasses.asdict(config)
