"""What one input row turns into: a Sample for the shard, or a SampleFailure with its reason."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

# how an image is brought to --image-size (see data_prep.images.encode_image)
RESIZE_MODES = ("border", "center_crop", "keep_ratio", "no")
# a caption is a sentence or a paragraph (CLIP reads 77 tokens); more than this is a wrong column
# or a wrong file, and reading it would cost memory for nothing
MAX_CAPTION_BYTES = 64 * 1024
# an image, or its resized version, with more pixels fails unread (--max-image-pixels);
# PIL's default MAX_IMAGE_PIXELS (1024**3 // 4 // 3: ~0.25 GB as RGB)
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
SOURCE_PREFIX = "source_"  # a source field named like one the pipeline writes is kept as source_<name>
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@dataclass
class Sample:
    """One shard entry: encoded JPEG bytes, the caption (`.txt`; None: an image without caption) and
    metadata (`.json`)."""

    jpg: bytes
    txt: Optional[str]
    meta: dict = field(default_factory=dict)


class SampleFailure(Exception):
    """A row that cannot become a sample; the message is the reason written to failures.jsonl."""


def unexpected_failure(err: Exception) -> SampleFailure:
    """An exception nobody turned into a reason, as one: `Type: message`, the same on every run.

    Memory addresses (`<object at 0x7f...>`) are dropped so the reason, and the failures file,
    do not change from run to run.
    """
    message = _ADDRESS.sub("", " ".join(str(err).split()))
    return SampleFailure(f"{type(err).__name__}: {message}" if message else type(err).__name__)


def sample_meta(source_fields: dict, written: dict) -> dict:
    """A sample's json fields: the source row's, plus the `written` ones the pipeline sets itself.

    A source field named like a written one (`key`, `width`, `original_height`, ...) is never
    overwritten: it is kept as `source_<name>` (another `source_` in front while that is taken).
    """
    meta = {name: value for name, value in source_fields.items() if name not in written}
    for name, value in source_fields.items():
        if name in written:
            kept = SOURCE_PREFIX + name
            while kept in meta or kept in written or kept in source_fields:
                kept = SOURCE_PREFIX + kept
            meta[kept] = value
    meta.update(written)
    return meta


def clean_caption(value) -> str:
    """The caption as stripped text, or SampleFailure when it is missing, empty or not text."""
    if value is None:
        raise SampleFailure("missing caption")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise SampleFailure("caption is not text (not UTF-8)") from None
    if not isinstance(value, str):
        raise SampleFailure(f"caption is not text ({type(value).__name__})")
    if len(value) > MAX_CAPTION_BYTES // 4 and len(value.encode("utf-8")) > MAX_CAPTION_BYTES:
        raise caption_too_long()
    text = value.strip()
    if not text:
        raise SampleFailure("empty caption")
    return text


def caption_too_long() -> SampleFailure:
    return SampleFailure(f"caption too long: over the limit of {MAX_CAPTION_BYTES} bytes")


def check_image_options(image_size: int, resize_mode: str, quality: int,
                        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
    """UserError for options the API was given that the CLI parser would have refused."""
    from mmssl.errors import UserError

    if resize_mode not in RESIZE_MODES:
        raise UserError(f"unknown resize mode {resize_mode!r}: choose from {', '.join(RESIZE_MODES)}")
    if image_size < 1:
        raise UserError(f"--image-size must be at least 1, got {image_size}")
    if not 1 <= quality <= 100:
        raise UserError(f"--quality must be 1..100, got {quality}")
    if not isinstance(max_image_pixels, int) or max_image_pixels < 1:
        raise UserError(f"--max-image-pixels must be a whole number >= 1, got {max_image_pixels!r}")
