"""Admitting an untrusted image: format and size are checked from the header before any pixel is decoded.

Why: a decoded image costs width x height x 3 bytes, and the query transform's shortest-side
resize multiplies that for thin images (a 1000x1 PNG of 112 bytes becomes a 224000x224 image,
~150 MB, at a 224-px model), while a PNG of a few KiB can declare 9500x9500 pixels (270 MB
decoded). `PIL.Image.open` only reads the header, so the sides, the pixel count and the aspect
ratio are known, and refused, before the decoder allocates anything. Only JPEG, PNG, WebP and GIF
(first frame) are opened at all: other decoders are not even tried on untrusted bytes.
A JPEG much larger than the model's input is decoded at a reduced DCT scale (`draft`), which
never goes below the size the transform needs.

Used for search queries (`mmssl serve`, `mmssl index search --image`: `QUERY_LIMITS`) and for
every image read from shards by the training and evaluation loaders (`SHARD_LIMITS`, looser: a
photo kept at full resolution is legitimate data there; a refusal makes the sample corrupt).
Status codes for the service: 400 for what is not an admissible image (other format, garbage,
truncated or corrupt data), 413 for an image over a limit (the message names the limit and its
flag).
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from mmssl.errors import UserError

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
FORMAT_NAMES = "JPEG, PNG, WebP or GIF"


@dataclass(frozen=True)
class ImageLimits:
    max_side: int = 4096             # pixels, either side
    max_pixels: int = 16_000_000     # width x height
    max_aspect: float = 20.0         # long side / short side

    def __post_init__(self):
        if self.max_side < 1 or self.max_pixels < 1 or self.max_aspect < 1:
            raise UserError("image limits must be >= 1 (--max-image-side, --max-image-pixels, --max-image-aspect)")


QUERY_LIMITS = ImageLimits()
SHARD_LIMITS = ImageLimits(max_side=16384, max_pixels=89_478_485, max_aspect=20.0)  # Pillow's bomb limit


class ImageRefused(UserError):
    """A query image that is not admitted; `status` is the HTTP status the service answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def admit_image(data: bytes, limits: ImageLimits = QUERY_LIMITS, target_size: int | None = None):
    """RGB PIL image of `data`, or ImageRefused. `target_size` (the model's input side) lets a big
    JPEG decode at 1/2, 1/4 or 1/8 scale while both sides stay >= target_size."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # our limits are stricter
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError:
        raise ImageRefused(413, f"image is over {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} Mpx, over the "
                                f"{limits.max_pixels / 1e6:g} Mpx limit (--max-image-pixels)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ImageRefused(400, f"not a {FORMAT_NAMES} image") from None
    check_size(*image.size, limits)
    if target_size and image.format == "JPEG":
        image.draft("RGB", (target_size, target_size))
    try:
        image.load()         # the first frame only, for a GIF
        return image if image.mode == "RGB" else image.convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError):
        raise ImageRefused(400, f"the {image.format} image data is truncated or corrupt") from None


def check_size(width: int, height: int, limits: ImageLimits) -> None:
    """ImageRefused(413) naming the first limit that width x height breaks."""
    if max(width, height) > limits.max_side:
        raise ImageRefused(413, f"image is {width}x{height}: a side over {limits.max_side} px (--max-image-side)")
    if width * height > limits.max_pixels:
        raise ImageRefused(413, f"image is {width}x{height} = {width * height / 1e6:.1f} Mpx, over the "
                                f"{limits.max_pixels / 1e6:g} Mpx limit (--max-image-pixels)")
    if min(width, height) < 1:
        raise ImageRefused(400, f"image is {width}x{height}: empty")
    aspect = max(width, height) / min(width, height)
    if aspect > limits.max_aspect:
        raise ImageRefused(413, f"image is {width}x{height}: aspect ratio {aspect:g}:1 over the "
                                f"{limits.max_aspect:g}:1 limit (--max-image-aspect)")
