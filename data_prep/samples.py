"""What one input row turns into: a Sample for the shard, or a SampleFailure with its reason."""
from __future__ import annotations

from dataclasses import dataclass, field

# how an image is brought to --image-size (see data_prep.images.encode_image)
RESIZE_MODES = ("border", "center_crop", "keep_ratio", "no")


@dataclass
class Sample:
    """One shard entry: encoded JPEG bytes, the caption (`.txt`) and metadata (`.json`)."""

    jpg: bytes
    txt: str
    meta: dict = field(default_factory=dict)


class SampleFailure(Exception):
    """A row that cannot become a sample; the message is the reason written to failures.jsonl."""


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
    text = value.strip()
    if not text:
        raise SampleFailure("empty caption")
    return text


def check_image_options(image_size: int, resize_mode: str, quality: int) -> None:
    """UserError for options the API was given that the CLI parser would have refused."""
    from mmssl.errors import UserError

    if resize_mode not in RESIZE_MODES:
        raise UserError(f"unknown resize mode {resize_mode!r}: choose from {', '.join(RESIZE_MODES)}")
    if image_size < 1:
        raise UserError(f"--image-size must be at least 1, got {image_size}")
    if not 1 <= quality <= 100:
        raise UserError(f"--quality must be 1..100, got {quality}")
