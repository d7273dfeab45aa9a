"""`mmssl prep coco`: COCO-captions JSON (images + annotations) into shards.

An image is one sample; its json keeps every caption, in annotation order, as `captions`, and its
txt holds the first. Training samples one caption of `captions` per step (so all of them are
used over time); retrieval evaluation scores against all of them, CLIP_benchmark-style.
The image record's other fields go into the json too; those the pipeline writes itself
(`captions`, `width`, `height`, ...) are kept as `source_<name>` (`source_width` is the
annotation file's width, `width` the shard image's).
"""
from __future__ import annotations

import json
from pathlib import Path

from data_prep.images import encode_image, read_image_file
from data_prep.input_files import inside_root
from data_prep.input_hash import file_sha256
from data_prep.pipeline import write_dataset
from data_prep.samples import (DEFAULT_MAX_IMAGE_PIXELS, Sample, SampleFailure, check_image_options, clean_caption,
                               sample_meta)


class CocoImageProcessor:
    """`(index, row) -> Sample` for a COCO image record carrying its gathered `captions`."""

    def __init__(self, *, images_dir: Path, image_options: dict):
        self.images_dir = images_dir
        self.image_options = image_options

    def __call__(self, index: int, row: dict) -> Sample:
        file_name = row.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise SampleFailure("missing column 'file_name'")
        captions = []
        for caption in row["captions"]:
            try:
                captions.append(clean_caption(caption))
            except SampleFailure:
                continue  # one blank caption among several is dropped; the image keeps the rest
        if not captions:
            raise SampleFailure("no non-empty caption" if row["captions"] else "no caption annotations")
        jpg, image_meta = encode_image(read_image_file(inside_root(self.images_dir, file_name, "--images")), **self.image_options)
        fields = {name: value for name, value in row.items() if name != "captions"}  # the gathered annotations
        return Sample(jpg, captions[0], sample_meta(fields, {"captions": captions, **image_meta}))


def read_coco(captions_path: Path) -> tuple[list[dict], int]:
    """(image rows with their `captions` list, count of annotations whose image is not listed)."""
    from mmssl.errors import UserError

    try:
        data = json.loads(captions_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"captions file not found: {captions_path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {captions_path} as JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise UserError(f"{captions_path} is not COCO captions: it needs 'images' and 'annotations' lists")
    # an image record's own `captions` field is kept as source_captions; `captions` gathers annotations
    rows = [sample_meta(image if isinstance(image, dict) else {"record": image}, {"captions": []})
            for image in data["images"]]
    by_id = {row["id"]: row for row in rows if _is_id(row.get("id"))}
    orphans = 0
    for annotation in data["annotations"]:
        image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
        row = by_id.get(image_id) if _is_id(image_id) else None
        if row is None:
            orphans += 1
        else:
            row["captions"].append(annotation.get("caption"))
    return rows, orphans


def _is_id(value) -> bool:
    """COCO ids are numbers or strings; anything else (a list, an object) matches nothing."""
    return isinstance(value, (int, float, str)) and not isinstance(value, bool)


def prepare(
    captions_path,
    images_dir,
    out_dir,
    *,
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
    """Shard a COCO-captions dataset into `out_dir`; returns the manifest."""
    from mmssl.errors import UserError

    check_image_options(image_size, resize_mode, quality, max_image_pixels)
    captions_path, images_dir = Path(captions_path).resolve(), Path(images_dir).resolve()
    if not images_dir.is_dir():
        raise UserError(f"--images {images_dir} is not a folder")
    rows, orphans = read_coco(captions_path)
    input_sha256 = file_sha256(captions_path)
    image_options = {"image_size": image_size, "resize_mode": resize_mode, "quality": quality,
                     "max_image_pixels": max_image_pixels}
    source = {"kind": "coco", "captions": str(captions_path), "images": str(images_dir), **image_options}
    return write_dataset(
        out_dir, rows, CocoImageProcessor(images_dir=images_dir, image_options=image_options),
        source=source, image_size=None if resize_mode == "no" else image_size, shard_size=shard_size,
        workers=workers, resume=resume, overwrite=overwrite, input_sha256=input_sha256, desc="prep coco", quiet=quiet,
        engine=engine, ray_address=ray_address,
        extra={"num_caption_annotations": sum(len(r["captions"]) for r in rows), "unmatched_annotations": orphans},
    )
