"""Build CLIP-style dual encoders the way open_clip does, from whatever the user has at hand.

`create_model` accepts an open_clip model name (random init, never a download), a bundled model
config (`configs/models/<name>.json`), a path to a model-config JSON, an `mmssl.config.ModelConfig`,
or an mmssl checkpoint. The result is a plain open_clip `CLIP` / `CustomTextCLIP` (`CoCa` for a config with
`multimodal_cfg`: open_clip's captioning model, whose text decoder trains as `loss.caption_weight`), so exporting to
open_clip is a matter of writing its state dict next to its model config (`mmssl.export`).
"""
from __future__ import annotations

import dataclasses
import json
import math
from contextlib import nullcontext
from copy import deepcopy
from dataclasses import asdict
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.coca_model import CoCa
from open_clip.model import CLIP, CustomTextCLIP, set_model_preprocess_cfg
from open_clip.transform import PreprocessCfg

from mmssl.config import BUNDLED_DIR, IMAGE_ONLY_KINDS, ModelConfig, from_dict
from mmssl.errors import UserError
from mmssl.models.hf_text import hf_text_cfg, quiet_transformers
from mmssl.models.locking import apply_locking
from mmssl.models.refs import (
    CHECKPOINT_SUFFIXES,
    ModelRef,
    missing_keys,
    parse_ref,
    read_checkpoint,
    read_torch_file,
    require_file,
    unreadable,
)
from mmssl.models.tokenizers import build_tokenizer

# the installed `mmssl.configs` package (the repo's configs/ in an editable install, mmssl/configs in a wheel)
MODEL_CONFIG_DIR = BUNDLED_DIR / "models"


def list_models() -> list[str]:
    """Bundled model configs first, then every architecture open_clip knows (CoCa's included)."""
    bundled = sorted(path.stem for path in MODEL_CONFIG_DIR.glob("*.json"))
    builtin = [name for name in open_clip.list_models() if name not in bundled]
    return bundled + builtin


def register_with_open_clip() -> None:
    """Make open_clip itself know the bundled configs (`open_clip.create_model("tiny-vit-64")`,
    `open_clip.get_tokenizer(...)`, and open_clip's trainer with `--model tiny-vit-64`, when called
    in the same process before `open_clip_train.main.main(argv)`)."""
    open_clip.add_model_config(MODEL_CONFIG_DIR)


def create_model(config_or_name: Any, *, siglip: bool = False, **overrides) -> torch.nn.Module:
    """Dual encoder with `encode_image`, `encode_text`, `logit_scale` (log-space) and `tokenizer`.

    `overrides` are `ModelConfig` fields (e.g. `lock_image=True`, `patch_dropout=0.5`).
    `siglip=True` adds the learnable `logit_bias` SigLIP needs (init -10, logit scale init log 10,
    as in open_clip's SigLIP configs). A checkpoint path (`.pt`) rebuilds the model from the
    checkpoint's `config["model"]`, loads its `model` state dict, ignores auxiliary `heads`, and
    returns it in eval mode; a training run folder means its `checkpoints/latest.pt`. `"openclip:NAME[:WEIGHTS]"` builds open_clip's NAME with optional
    local open_clip-format weights. A string is parsed by `mmssl.models.refs.parse_ref` (a `ModelRef`
    is taken as is).
    """
    if isinstance(config_or_name, ModelConfig):
        return build_model(_with_overrides(config_or_name, overrides), siglip=siglip)
    if isinstance(config_or_name, (str, Path, ModelRef)):
        ref = parse_ref(config_or_name).check()
        if ref.is_checkpoint:
            return load_checkpoint_model(ref.path, **overrides)
        name = str(ref.path) if ref.kind == "config" else ref.name
        model_cfg = ModelConfig(name=name, pretrained=str(ref.weights) if ref.weights else None)
        return build_model(_with_overrides(model_cfg, overrides), siglip=siglip)
    raise UserError(f"cannot build a model from {type(config_or_name).__name__}: give a name, a ModelConfig or a path")


def load_checkpoint_model(path: str | Path, **overrides) -> torch.nn.Module:
    """The dual encoder saved in an mmssl checkpoint (file or run folder), in eval mode (auxiliary
    heads are dropped)."""
    checkpoint = read_checkpoint(path)
    model_cfg = from_dict(ModelConfig, checkpoint["config"].get("model", {}), "model")
    model_cfg = _with_overrides(dataclasses.replace(model_cfg, pretrained=None), overrides)
    model = build_model(model_cfg, load_weights=False, siglip="logit_bias" in checkpoint["model"])
    model.load_state_dict(checkpoint["model"])
    kind = (checkpoint["config"].get("loss") or {}).get("kind")
    if kind in IMAGE_ONLY_KINDS:
        model.text_free = f"trained with loss.kind={kind}"   # its text tower is the untrained init
    return model.eval()


def require_text_tower(model: torch.nn.Module, what: str) -> None:
    """UserError when the model's text tower was never trained (an image-only checkpoint)."""
    why = getattr(model, "text_free", None)
    if why:
        raise UserError(f"{what} needs a text tower; this checkpoint has none ({why}, image only): "
                        f"use mmssl eval linear-probe, eval knn or an image index")


def build_model(model_cfg: ModelConfig, load_weights: bool = True, siglip: bool = False) -> torch.nn.Module:
    """Instantiate the architecture, load `pretrained` weights if asked, then lock / checkpoint.

    `load_weights=False` skips both `pretrained` and the Hugging Face tower's own weights: the
    caller is about to load a full state dict anyway.
    """
    name, oc_cfg = resolve_model_config(model_cfg, hf_weights=load_weights)
    if siglip and "init_logit_bias" not in oc_cfg:
        oc_cfg.update(init_logit_scale=math.log(10.0), init_logit_bias=-10.0)
    model = _instantiate(name, oc_cfg)
    if load_weights and model_cfg.pretrained:
        load_pretrained(model, model_cfg.pretrained)
    apply_locking(model, model_cfg)
    if model_cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.tokenizer = build_tokenizer(oc_cfg["text_cfg"])
    model.model_name = name
    model.model_config = model_cfg
    model.open_clip_config = export_model_config(oc_cfg)
    return model


def resolve_model_config(model_cfg: ModelConfig, hf_weights: bool = True) -> tuple[str, dict]:
    """(name, open_clip model config dict) with `hf_text` and `patch_dropout` applied."""
    name, oc_cfg = _lookup_model_config(model_cfg.name)
    if "multimodal_cfg" in oc_cfg and (model_cfg.lock_image or model_cfg.lock_text):
        raise UserError(f"model {name}: tower locking (model.lock_image / lock_text) is not supported for CoCa models")
    if model_cfg.hf_text:
        oc_cfg["text_cfg"] = hf_text_cfg(model_cfg.hf_text, oc_cfg["text_cfg"], load_weights=hf_weights)
    if model_cfg.patch_dropout:
        if not 0.0 <= model_cfg.patch_dropout < 1.0:
            raise UserError(f"model.patch_dropout must be in [0, 1), got {model_cfg.patch_dropout}")
        if not _is_vit(oc_cfg["vision_cfg"]):
            raise UserError(f"model.patch_dropout needs a ViT image tower; {name} has none")
        oc_cfg["vision_cfg"]["patch_dropout"] = model_cfg.patch_dropout
    if "timm_model_name" in oc_cfg["vision_cfg"]:
        oc_cfg["vision_cfg"]["timm_model_pretrained"] = False  # never download ImageNet weights
    return name, oc_cfg


def export_model_config(oc_cfg: dict) -> dict:
    """The open_clip model config as open_clip's own JSON files write it (no load-time switches)."""
    exported = deepcopy(oc_cfg)
    exported["text_cfg"].pop("hf_model_pretrained", None)
    exported["vision_cfg"].pop("timm_model_pretrained", None)
    return exported


def load_pretrained(model: torch.nn.Module, path: str) -> None:
    """Load a local weights file: an mmssl checkpoint or an open_clip-format state dict."""
    file = require_file(path, "weights file")
    if file.suffix in CHECKPOINT_SUFFIXES:
        payload = read_torch_file(file, "weights file")
        if not missing_keys(payload):
            _load_state_dict(model, payload["model"], path)
            return
    try:
        open_clip.load_checkpoint(model, str(file))  # open_clip's formats (.bin, .safetensors, DDP prefixes)
    except RuntimeError as err:
        raise UserError(f"model.pretrained: {path} does not fit this model ({str(err).splitlines()[0]})") from None
    except Exception as err:  # unpickling / safetensors errors for a file that is not weights
        raise unreadable(path, "weights file", err) from None


def _load_state_dict(model: torch.nn.Module, state_dict: dict, path: str) -> None:
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        raise UserError(f"model.pretrained: {path} does not fit this model ({str(err).splitlines()[0]})") from None


def _lookup_model_config(name: str) -> tuple[str, dict]:
    """Bundled JSON, a JSON path, or an open_clip built-in name -> a fresh config dict."""
    path = Path(name)
    bundled = MODEL_CONFIG_DIR / f"{name}.json"
    if bundled.is_file():
        return name, _read_model_json(bundled)
    if path.suffix == ".json":
        if not path.is_file():
            raise UserError(f"model config not found: {name}")
        return path.stem, _read_model_json(path)
    builtin = open_clip.get_model_config(name)
    if builtin is None:
        known = ", ".join(list_models()[:8])
        raise UserError(f"unknown model: {name} (known include: {known}, ...; or give a model-config .json path)")
    return name, builtin


def _read_model_json(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg})") from None
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in cfg]
    if missing:
        raise UserError(f"{path}: not an open_clip model config (missing {', '.join(missing)})")
    return cfg


def _instantiate(name: str, oc_cfg: dict) -> torch.nn.Module:
    """The open_clip class the config asks for, with open_clip's preprocessing attached: `CoCa`
    (its own text decoder) for a config with `multimodal_cfg`, else `CLIP` / `CustomTextCLIP`."""
    kwargs = deepcopy(oc_cfg)
    custom_text = kwargs.pop("custom_text", False) or "hf_model_name" in kwargs["text_cfg"]
    kwargs.pop("preprocess_cfg", None)
    if "multimodal_cfg" in kwargs:
        model_class = CoCa                # forward() always returns a dict (with the decoder's logits)
    else:
        kwargs["output_dict"] = True  # forward() returns {image_features, text_features, logit_scale[, logit_bias]}
        model_class = CustomTextCLIP if custom_text else CLIP
    quiet = quiet_transformers() if custom_text else nullcontext()
    try:
        with quiet:
            model = model_class(**kwargs)
    except TypeError as err:
        raise UserError(f"model {name}: bad model config ({err})") from None
    if model_class is CoCa:
        # open_clip's MultimodalTransformer never initialises its text_projection (its init_parameters
        # is never called, and fails if called): the weight would be torch.empty memory, zeros, garbage
        # or NaN from run to run. Give it the std that init_parameters meant, width ** -0.5.
        decoder = model.text_decoder
        torch.nn.init.normal_(decoder.text_projection, std=decoder.width ** -0.5)
    preprocess = asdict(PreprocessCfg())
    preprocess.update(oc_cfg.get("preprocess_cfg", {}))
    preprocess["size"] = model.visual.image_size
    set_model_preprocess_cfg(model, preprocess)
    return model


def _is_vit(vision_cfg: dict) -> bool:
    return "timm_model_name" not in vision_cfg and not isinstance(vision_cfg.get("layers"), (list, tuple))


def _with_overrides(model_cfg: ModelConfig, overrides: dict) -> ModelConfig:
    if not overrides:
        return model_cfg
    merged = {**dataclasses.asdict(model_cfg), **overrides}
    return from_dict(ModelConfig, merged, "model")
