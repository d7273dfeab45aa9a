"""A local Hugging Face encoder as the text tower, through open_clip's own HF adapter.

open_clip's `CustomTextCLIP` builds `HFTextEncoder` from `text_cfg.hf_model_name`; given a local
directory, `transformers.AutoModel.from_pretrained` reads the weights from disk, so no network is
involved. We pool with the attention-masked mean (what sentence-transformers models such as
all-MiniLM-L6-v2 were trained with) and add a linear projection to the shared embedding size.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from mmssl.errors import UserError


def hf_text_cfg(directory: str, base_text_cfg: dict, load_weights: bool = True) -> dict:
    """open_clip `text_cfg` for the HF model in `directory`, keeping the base config's context length.

    `load_weights=False` builds the architecture from its config only (weights come from a checkpoint).
    The directory is stored resolved, because exported open_clip configs point at it.
    """
    path = Path(directory).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"model.hf_text: {directory} is not a Hugging Face model directory (no config.json)")
    resolved = str(path.resolve())
    return {
        "hf_model_name": resolved,
        "hf_tokenizer_name": resolved,
        "hf_model_pretrained": load_weights,
        "hf_pooler_type": "mean_pooler",
        "hf_proj_type": "linear",
        "context_length": base_text_cfg.get("context_length", 77),
    }


def is_hf_text_tower(model) -> bool:
    """True when the model's text tower is open_clip's Hugging Face adapter."""
    from open_clip.hf_model import HFTextEncoder

    return isinstance(getattr(model, "text", None), HFTextEncoder)


@contextmanager
def quiet_transformers():
    """Silence transformers' per-load report and progress bar (dropping BERT's unused pooler is expected)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
