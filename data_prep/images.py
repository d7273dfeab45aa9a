"""Decode, resize and JPEG-encode one image, turning every way it can be broken into a reason.

Speed matters here (it is most of `prep csv`'s time): JPEGs are decoded with PIL's `draft()`,
which lets libjpeg scale by 1/2, 1/4 or 1/8 during decoding, so a 512 px photo bound for 256 px
is never decoded at full size. The remaining resize uses Lanczos.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from data_prep.samples import SampleFailure
_FILTER = Image.Resampling.LANCZOS


def read_image_file(path) -> bytes:
    """The file's bytes, or SampleFailure for a missing, unreadable or empty file."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise SampleFailure(f"missing file: {path}") from None
    except OSError as err:
        raise SampleFailure(f"unreadable file: {path}: {err.strerror or err}") from None
    if not data:
        raise SampleFailure(f"empty file (0 bytes): {path}")
    return data


def encode_image(data: bytes, *, image_size: int, resize_mode: str = "border", quality: int = 95):
    """(jpg bytes, size metadata) for the shard; SampleFailure if the image cannot be decoded.

    border: longer side = image_size, padded with black to a square (img2dataset's default);
    center_crop: shorter side = image_size, then the centre square; keep_ratio: shorter side =
    image_size; no: original pixels (an RGB JPEG is kept byte for byte after a full decode check).
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width == 0 or height == 0:  # PIL refuses most such files at open; not all formats
                raise SampleFailure("zero-pixel image")
            meta = {"original_width": width, "original_height": height}
            if resize_mode == "no" and image.format == "JPEG" and image.mode == "RGB":
                image.load()  # full decode: catches truncated files
                return data, {**meta, "width": width, "height": height}
            if image.format == "JPEG" and resize_mode != "no":
                image.draft("RGB", _decode_size(width, height, image_size, resize_mode))
            image.load()  # decode inside the try: broken data fails here, as a reason
            rgb = image if image.mode == "RGB" else image.convert("RGB")
    except SampleFailure:
        raise
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, bombs...)
        raise SampleFailure(_decode_reason(err)) from None
    resized = _resize(rgb, image_size, resize_mode)
    buffer = io.BytesIO()
    resized.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue(), {**meta, "width": resized.width, "height": resized.height}


def _decode_reason(err: Exception) -> str:
    if isinstance(err, UnidentifiedImageError):  # its message names a memory address: not reproducible
        return "unreadable image: not a known image format, or corrupt"
    message = " ".join(str(err).split()) or type(err).__name__
    if "truncated" in message:
        return f"truncated image: {message}"
    return f"unreadable image: {message}"


def _scale(width: int, height: int, size: int, mode: str) -> float:
    """Factor that brings the image to its target: longer side for border, shorter side otherwise."""
    return size / max(width, height) if mode == "border" else size / min(width, height)


def _decode_size(width: int, height: int, size: int, mode: str) -> tuple[int, int]:
    """The smallest decode that still covers the target, so draft() never loses resolution."""
    scale = min(1.0, _scale(width, height, size, mode))
    return math.ceil(width * scale), math.ceil(height * scale)


def _resize(image: Image.Image, size: int, mode: str) -> Image.Image:
    if mode == "no":
        return image
    width, height = image.size
    scale = _scale(width, height, size, mode)
    if mode == "center_crop":
        crop_w, crop_h = size / scale, size / scale  # the centre square, in source pixels
        left, top = (width - crop_w) / 2, (height - crop_h) / 2
        return image.resize((size, size), _FILTER, box=(left, top, left + crop_w, top + crop_h), reducing_gap=3.0)
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    if target != image.size:
        image = image.resize(target, _FILTER, reducing_gap=3.0)
    if mode == "keep_ratio" or target == (size, size):
        return image
    canvas = Image.new("RGB", (size, size))
    canvas.paste(image, ((size - target[0]) // 2, (size - target[1]) // 2))
    return canvas
