"""`mmssl prep csv`: a table of image paths and captions (CSV, TSV, JSONL, parquet) into shards.

Every column other than the image and caption goes into the sample's json, as img2dataset does
with its additional columns; a column named like a field the pipeline writes (`key`, `width`,
`height`, `original_width`, `original_height`) is kept as `source_<name>` (data_prep.samples.sample_meta).
"""
from __future__ import annotations

import os
from pathlib import Path

from data_prep import tables
from data_prep.images import encode_image, read_image_file
from data_prep.input_files import inside_root
from data_prep.input_hash import file_sha256
from data_prep.pipeline import write_dataset
from data_prep.samples import (DEFAULT_MAX_IMAGE_PIXELS, Sample, SampleFailure, check_image_options, clean_caption,
                               sample_meta)


class TableRowProcessor:
    """`(index, row) -> Sample`: reads the row's image file, resizes it and keeps its caption."""

    def __init__(self, *, image_root: Path, image_col: str, caption_col: str, image_options: dict):
        self.image_root = image_root
        self.image_col = image_col
        self.caption_col = caption_col
        self.image_options = image_options

    def __call__(self, index: int, row) -> Sample:
        if isinstance(row, tables.BadRow):
            raise SampleFailure(row.reason)
        for column in (self.image_col, self.caption_col):
            if column not in row:
                raise SampleFailure(f"missing column {column!r}")
        caption = clean_caption(row[self.caption_col])
        jpg, image_meta = encode_image(read_image_file(self._image_path(row[self.image_col])), **self.image_options)
        return Sample(jpg, caption, sample_meta({**row, self.caption_col: caption}, image_meta))

    def _image_path(self, value) -> Path:
        if not isinstance(value, str) or not value.strip():
            raise SampleFailure(f"missing image path in column {self.image_col!r}")
        if "://" in value:
            raise SampleFailure(f"remote image URLs are not supported (no network): {value}")
        return inside_root(self.image_root, os.path.expanduser(value.strip()), "--image-root")


def prepare(
    input_path,
    out_dir,
    *,
    image_root=None,
    image_col: str = "image",
    caption_col: str = "caption",
    image_size: int = 256,
    resize_mode: str = "border",
    quality: int = 95,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    shard_size: int = 1000,
    workers: int = 1,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    engine: str = "local",
    ray_address: str | None = None,
) -> dict:
    """Shard the table at `input_path` into `out_dir`; returns the manifest.

    Relative image paths start at `image_root` (default: the table's own folder).
    """
    from mmssl.errors import UserError

    check_image_options(image_size, resize_mode, quality, max_image_pixels)
    input_path = Path(input_path).resolve()
    columns, rows = tables.read_table(input_path)
    input_sha256 = file_sha256(input_path)
    tables.require_columns(columns, {"--image-col": image_col, "--caption-col": caption_col}, input_path)
    root = Path(image_root).resolve() if image_root is not None else input_path.parent
    if not root.is_dir():
        raise UserError(f"--image-root {root} is not a folder")
    image_options = {"image_size": image_size, "resize_mode": resize_mode, "quality": quality,
                     "max_image_pixels": max_image_pixels}
    source = {"kind": "csv", "input": str(input_path), "image_root": str(root), "image_col": image_col,
              "caption_col": caption_col, **image_options}
    processor = TableRowProcessor(image_root=root, image_col=image_col, caption_col=caption_col,
                                  image_options=image_options)
    return write_dataset(
        out_dir, rows, processor, source=source, image_size=None if resize_mode == "no" else image_size,
        shard_size=shard_size, workers=workers, resume=resume, overwrite=overwrite, input_sha256=input_sha256,
        desc="prep csv", quiet=quiet, engine=engine, ray_address=ray_address,
    )
