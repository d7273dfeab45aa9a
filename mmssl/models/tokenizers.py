"""The tokenizer that matches a text tower: list[str] -> LongTensor [N, context_length]."""
from __future__ import annotations

from mmssl.errors import UserError


def build_tokenizer(text_cfg: dict):
    """open_clip's CLIP BPE tokenizer, or the HF tokenizer named by the config, at its context length.

    open_clip's `get_tokenizer` only knows registered model names; we build from the config itself so
    that bundled and path-given configs get their own `context_length` (e.g. 32 for tiny-vit-64).
    """
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    context_length = text_cfg.get("context_length", 77)
    hf_name = text_cfg.get("hf_tokenizer_name")
    if not hf_name:
        return SimpleTokenizer(context_length=context_length, **text_cfg.get("tokenizer_kwargs", {}))
    try:
        return HFTokenizer(hf_name, context_length=context_length, **text_cfg.get("tokenizer_kwargs", {}))
    except OSError as err:
        raise UserError(f"tokenizer {hf_name} is not available locally ({str(err).splitlines()[0]})") from None
