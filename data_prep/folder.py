"""`mmssl prep folder`: an image folder with sidecar captions, ImageNet-style class folders, or plain images.

captions layout: `a/b.jpg` + `a/b.txt` (the caption).  classes layout: `CLASS/.../image.jpg`;
labels follow the sorted class-folder names (torchvision ImageFolder's order), classnames.txt and
templates.txt are written beside the manifest so the folder is a zero-shot eval set as it stands.
images layout: images without captions or labels (shards with no `.txt`), for image-only
self-supervised training (`loss.kind=simclr`); auto picks it for a flat folder without captions.
"""
from __future__ import annotations

from pathlib import Path

from data_prep.images import encode_image, read_image_file
from data_prep.input_files import FileTooLarge, inside_root, read_regular_file
from data_prep.input_hash import file_sha256, listing_sha256
from data_prep.pipeline import write_dataset
from data_prep.samples import (DEFAULT_MAX_IMAGE_PIXELS, MAX_CAPTION_BYTES, Sample, SampleFailure, caption_too_long,
                               check_image_options, clean_caption, sample_meta)
from data_prep.shards import write_lines

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# a few of CLIP's ImageNet prompt templates: a sensible default for an arbitrary class folder
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
)


class FolderImageProcessor:
    """`(index, row) -> Sample` for a row {"image": relative path, + caption or class fields}."""

    def __init__(self, *, root: Path, layout: str, image_options: dict):
        self.root = root
        self.layout = layout
        self.image_options = image_options

    def __call__(self, index: int, row: dict) -> Sample:
        if self.layout == "classes":
            if row["label"] is None:
                raise SampleFailure("image is not inside a class sub-folder")
            caption = row["classname"]
        elif self.layout == "images":
            caption = None
        else:
            caption_file = inside_root(self.root, str(Path(row["image"]).with_suffix(".txt")), "--input")
            caption = clean_caption(_read_caption_file(caption_file))
        jpg, image_meta = encode_image(read_image_file(inside_root(self.root, row["image"], "--input")),
                                       **self.image_options)
        return Sample(jpg, caption, sample_meta(row, image_meta))


def _read_caption_file(path: Path) -> bytes:
    """The sidecar caption's bytes (at most MAX_CAPTION_BYTES), or SampleFailure with the reason."""
    try:
        return read_regular_file(path, max_bytes=MAX_CAPTION_BYTES)
    except FileNotFoundError:
        raise SampleFailure(f"missing caption file {path.name}") from None
    except FileTooLarge:
        raise caption_too_long() from None
    except OSError as err:
        raise SampleFailure(f"unreadable caption file {path.name}: {err.strerror or err}") from None


def find_images(root: Path) -> list[str]:
    """Image files under root as sorted POSIX paths relative to it (a stable row order)."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def detect_layout(root: Path, images: list[str]) -> str:
    if any((root / image).with_suffix(".txt").is_file() for image in images):
        return "captions"
    if any("/" in image for image in images):
        return "classes"
    return "images"


def _class_names(folders: list[str], classnames_file) -> list[str]:
    from mmssl.errors import UserError

    if classnames_file is None:
        return [folder.replace("_", " ") for folder in folders]
    try:
        names = [line.strip() for line in Path(classnames_file).read_text().splitlines() if line.strip()]
    except OSError as err:
        raise UserError(f"cannot read --classnames {classnames_file}: {err.strerror or err}") from None
    if len(names) != len(folders):
        raise UserError(f"--classnames {classnames_file} has {len(names)} names for {len(folders)} class folders")
    return names


def _read_templates(templates_file) -> list[str]:
    from mmssl.errors import UserError

    if templates_file is None:
        return list(DEFAULT_TEMPLATES)
    try:
        templates = [line.strip() for line in Path(templates_file).read_text().splitlines() if line.strip()]
    except OSError as err:
        raise UserError(f"cannot read --templates {templates_file}: {err.strerror or err}") from None
    if not templates or any("{}" not in t for t in templates):
        raise UserError(f"--templates {templates_file}: every line must hold a {{}} for the class name")
    return templates


def _folder_sha256(root: Path, images: list[str], layout: str, classnames_file) -> str:
    """The folder's input hash (data_prep.input_hash): its images, their caption files, and the
    --classnames file's bytes, which name the labels."""
    files = list(images)
    if layout == "captions":
        files += [caption for caption in (str(Path(image).with_suffix(".txt")) for image in images)
                  if (root / caption).exists()]
    extra = {"classnames_sha256": file_sha256(classnames_file)} if classnames_file is not None else None
    return listing_sha256(root, files, extra)


def prepare(
    input_dir,
    out_dir,
    *,
    layout: str = "auto",
    classnames_file=None,
    templates_file=None,
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
    """Shard the image folder `input_dir` into `out_dir`; returns the manifest."""
    from mmssl.errors import UserError

    check_image_options(image_size, resize_mode, quality, max_image_pixels)
    if layout not in ("auto", "captions", "classes", "images"):
        raise UserError(f"unknown --layout {layout!r}: choose auto, captions, classes or images")
    root = Path(input_dir).resolve()
    if not root.is_dir():
        raise UserError(f"input folder not found: {root}")
    images = find_images(root)
    if not images:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    if layout == "auto":
        layout = detect_layout(root, images)
    extra, names, templates = {"layout": layout}, None, None
    if layout == "classes":
        folders = sorted({image.split("/", 1)[0] for image in images if "/" in image})
        names = _class_names(folders, classnames_file)
        templates = _read_templates(templates_file)
        label_of = {folder: i for i, folder in enumerate(folders)}
        rows = []
        for image in images:
            folder = image.split("/", 1)[0] if "/" in image else None
            label = label_of.get(folder)
            rows.append({"image": image, "label": label, "classname": None if label is None else names[label]})
        extra["num_classes"] = len(names)
    else:
        rows = [{"image": image} for image in images]
    image_options = {"image_size": image_size, "resize_mode": resize_mode, "quality": quality,
                     "max_image_pixels": max_image_pixels}
    source = {"kind": "folder", "input": str(root), "layout": layout, **image_options}
    manifest = write_dataset(
        out_dir, rows, FolderImageProcessor(root=root, layout=layout, image_options=image_options),
        source=source, image_size=None if resize_mode == "no" else image_size, shard_size=shard_size,
        workers=workers, resume=resume, overwrite=overwrite, extra=extra,
        input_sha256=_folder_sha256(root, images, layout, classnames_file), desc="prep folder", quiet=quiet,
        engine=engine, ray_address=ray_address,
    )
    if names is not None:
        write_lines(Path(out_dir) / "classnames.txt", names)
        write_lines(Path(out_dir) / "templates.txt", templates)
    return manifest
