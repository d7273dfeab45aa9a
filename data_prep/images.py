"""Decode, resize and JPEG-encode one image, turning every way it can be broken into a reason.

Speed matters here (it is most of `prep csv`'s time): JPEGs are decoded with PIL's `draft()`,
which lets libjpeg scale by 1/2, 1/4 or 1/8 during decoding, so a 512 px photo bound for 256 px
is never decoded at full size. The remaining resize uses Lanczos.

Work is bounded before it is done: from the header alone, an image over `max_image_pixels`, or
one whose resize would exceed that many pixels or JPEG's largest side (a 2x600 sliver at
keep_ratio 256 would become 256x76800), is a failure with its reason, not a decode, a huge
allocation or an error deep in Pillow. That limit replaces PIL's own decompression-bomb check
(which only warns below twice its limit) while an image is decoded here.
"""
from __future__ import annotations

import contextlib
import io
import math
import warnings

from PIL import Image, UnidentifiedImageError

from data_prep.input_files import NotRegularFile, read_regular_file
from data_prep.samples import DEFAULT_MAX_IMAGE_PIXELS, SampleFailure

_FILTER = Image.Resampling.LANCZOS
MAX_OUTPUT_SIDE = 65500  # the largest side a JPEG can hold (libjpeg's JPEG_MAX_DIMENSION)


def read_image_file(path) -> bytes:
    """The file's bytes, or SampleFailure for a missing, unreadable, empty or non-regular file."""
    try:
        data = read_regular_file(path)
    except FileNotFoundError:
        raise SampleFailure(f"missing file: {path}") from None
    except NotRegularFile:
        raise SampleFailure(f"not a regular file: {path}") from None
    except OSError as err:
        raise SampleFailure(f"unreadable file: {path}: {err.strerror or err}") from None
    if not data:
        raise SampleFailure(f"empty file (0 bytes): {path}")
    return data


def encode_image(data: bytes, *, image_size: int, resize_mode: str = "border", quality: int = 95,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
    """(jpg bytes, size metadata) for the shard; SampleFailure if the image cannot be decoded
    or is too large (see the module docstring).

    border: longer side = image_size, padded with black to a square (img2dataset's default);
    center_crop: shorter side = image_size, then the centre square; keep_ratio: shorter side =
    image_size; no: original pixels (an RGB JPEG is kept byte for byte after a full decode check).
    """
    try:
        with _pixel_limit_is_ours(), Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width == 0 or height == 0:  # PIL refuses most such files at open; not all formats
                raise SampleFailure("zero-pixel image")
            _check_sizes(width, height, image_size, resize_mode, max_image_pixels)
            meta = {"original_width": width, "original_height": height}
            if resize_mode == "no" and image.format == "JPEG" and image.mode == "RGB":
                image.load()  # full decode: catches truncated files
                return data, {**meta, "width": width, "height": height}
            if image.format == "JPEG" and resize_mode != "no":
                image.draft("RGB", _decode_size(width, height, image_size, resize_mode))
            image.load()  # decode inside the try: broken data fails here, as a reason
            if image.width * image.height > max_image_pixels:  # a format whose decode outgrew its header
                raise SampleFailure(_too_many_pixels("image too large: decoded to", image.size, max_image_pixels))
            rgb = image if image.mode == "RGB" else image.convert("RGB")
    except SampleFailure:
        raise
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, bombs...)
        raise SampleFailure(_decode_reason(err)) from None
    resized = _resize(rgb, image_size, resize_mode)
    buffer = io.BytesIO()
    resized.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue(), {**meta, "width": resized.width, "height": resized.height}


@contextlib.contextmanager
def _pixel_limit_is_ours():
    """Switch PIL's global decompression-bomb limit off while one image is decoded: the caller's
    `max_image_pixels` is checked instead (above PIL's limit too), and any bomb warning PIL might
    still emit becomes an error, hence a failure reason rather than a log line."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _check_sizes(width: int, height: int, size: int, mode: str, max_pixels: int) -> None:
    """SampleFailure when the source or the resized image is too large, decided from the header."""
    if width * height > max_pixels:
        raise SampleFailure(_too_many_pixels("image too large:", (width, height), max_pixels))
    out = output_size(width, height, size, mode)
    how = "no resize keeps" if mode == "no" else f"{mode} at {size} px makes"
    if max(out) > MAX_OUTPUT_SIDE:
        raise SampleFailure(
            f"output too large: {how} {out[0]}x{out[1]}, over JPEG's {MAX_OUTPUT_SIDE}-pixel side limit")
    if out[0] * out[1] > max_pixels:
        raise SampleFailure(_too_many_pixels(f"output too large: {how}", out, max_pixels))


def _too_many_pixels(what: str, size: tuple[int, int], limit: int) -> str:
    return f"{what} {size[0]}x{size[1]} = {size[0] * size[1]} pixels, over the limit of {limit} (--max-image-pixels)"


def output_size(width: int, height: int, size: int, mode: str) -> tuple[int, int]:
    """The (width, height) a width x height image has in the shard under `mode` at `size`."""
    if mode == "no":
        return width, height
    if mode == "keep_ratio":
        return _scaled_size(width, height, size, mode)
    return size, size


def _decode_reason(err: Exception) -> str:
    if isinstance(err, (Image.DecompressionBombWarning, Image.DecompressionBombError)):
        return f"image too large: {' '.join(str(err).split())}"
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


def _scaled_size(width: int, height: int, size: int, mode: str) -> tuple[int, int]:
    """border / keep_ratio: the image scaled by _scale, at least one pixel each way."""
    scale = _scale(width, height, size, mode)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _resize(image: Image.Image, size: int, mode: str) -> Image.Image:
    if mode == "no":
        return image
    width, height = image.size
    if mode == "center_crop":
        scale = _scale(width, height, size, mode)
        crop_w, crop_h = size / scale, size / scale  # the centre square, in source pixels
        left, top = (width - crop_w) / 2, (height - crop_h) / 2
        return image.resize((size, size), _FILTER, box=(left, top, left + crop_w, top + crop_h), reducing_gap=3.0)
    target = _scaled_size(width, height, size, mode)
    if target != image.size:
        image = image.resize(target, _FILTER, reducing_gap=3.0)
    if mode == "keep_ratio" or target == (size, size):
        return image
    canvas = Image.new("RGB", (size, size))
    canvas.paste(image, ((size - target[0]) // 2, (size - target[1]) // 2))
    return canvas
