"""Class names and prompt templates for zero-shot classification: bundled sets and files.

A template turns a class name into a prompt ("a photo of a {}."). Files hold one template per
line with `{}` (or `{c}`) where the class name goes, and one class name per line. ImageNet names
and OpenAI's templates come from open_clip's metadata; CIFAR names are the datasets' own labels.
The synthetic world ships its `classnames.txt` / `templates.txt` beside its manifest, which is
why those files are the default for a data folder that has them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

from mmssl.errors import UserError

Template = Callable[[str], str]
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "templates.txt"

CIFAR10_CLASSNAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

# the CIFAR-100 fine labels in label order, underscores read as spaces
CIFAR100_CLASSNAMES = (
    "apple", "aquarium fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn mower", "leopard", "lion", "lizard", "lobster", "man", "maple tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak tree", "orange", "orchid", "otter", "palm tree", "pear", "pickup truck", "pine tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow tree", "wolf", "woman", "worm",
)


def bundled_classnames(name: str) -> Optional[tuple[str, ...]]:
    """The named bundled class list (imagenet | cifar10 | cifar100), or None for other names."""
    if name == "imagenet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return tuple(IMAGENET_CLASSNAMES)
    return {"cifar10": CIFAR10_CLASSNAMES, "cifar100": CIFAR100_CLASSNAMES}.get(name)


def bundled_templates(name: str) -> Optional[tuple[Template, ...]]:
    """OpenAI's 80 ImageNet templates ("openai") or their 7-template subset ("simple"), else None."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    return {"openai": OPENAI_IMAGENET_TEMPLATES, "simple": SIMPLE_IMAGENET_TEMPLATES}.get(name)


def load_classnames(spec: Optional[str], data_dir: Optional[Path], folder_classes: Sequence[str] = (),
                    defaults: Optional[Sequence[str]] = None) -> list[str]:
    """Class names from `spec` (a bundled name or a file); by default `defaults` (the names a
    CLIP_benchmark folder ships), else the data's classnames.txt, else the class folder names of
    an ImageNet-style folder (underscores read as spaces)."""
    if spec:
        names = bundled_classnames(spec)
        return list(names) if names is not None else _read_lines(Path(spec), "classnames")
    if defaults:
        return list(defaults)
    if data_dir is not None and (data_dir / CLASSNAMES_FILE).is_file():
        return _read_lines(data_dir / CLASSNAMES_FILE, "classnames")
    if folder_classes:
        return [name.replace("_", " ") for name in folder_classes]
    raise UserError(f"no class names: {data_dir} has no {CLASSNAMES_FILE}; pass --classnames FILE|imagenet|cifar10|cifar100")


def load_templates(spec: Optional[str], data_dir: Optional[Path],
                   defaults: Optional[Sequence[str]] = None) -> list[Template]:
    """Templates from `spec` (openai | simple | a file); by default the lines `defaults` (a
    CLIP_benchmark folder's), else the data's templates.txt, else openai."""
    if not spec and defaults:
        return [template_from_text(line, "the data's templates") for line in defaults]
    if not spec:
        local = data_dir / TEMPLATES_FILE if data_dir is not None else None
        spec = str(local) if local is not None and local.is_file() else "openai"
    bundled = bundled_templates(spec)
    if bundled is not None:
        return list(bundled)
    return [template_from_text(line, spec) for line in _read_lines(Path(spec), "templates")]


def template_from_text(text: str, where: str = "templates") -> Template:
    """"a photo of a {}." -> a function of the class name; `{c}` is accepted for `{}`."""
    pattern = text.replace("{c}", "{}")
    if "{}" not in pattern:
        raise UserError(f"{where}: template without a '{{}}' placeholder: {text!r}")
    return lambda classname: pattern.replace("{}", classname)


def _read_lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise UserError(f"{what} file not found: {path} (or name a bundled set)")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise UserError(f"{what} file is empty: {path}")
    return lines
