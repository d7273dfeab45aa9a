"""The embedded synthetic world: coloured shapes on noise, captioned from templates.

8 colours x 6 shapes x 2 sizes; a train scene holds one or two objects, a val or heldout scene one,
a binding scene two. The 48 labels are colour + shape (index = colour_index * 6 + shape_index, the
classnames.txt order).
Six colour-shape pairs, one per shape with six different colours, never occur anywhere in train:
`heldout` scores whether a model composes colour and shape it only saw apart.
`binding` holds two-object scenes (two seen pairs, different colours and different shapes) whose
json lists the true caption first, then one negative per kind of attribute swap (colour, shape,
position): caption selection scores whether a model binds each colour to its own shape and place.
`labelled` is a labelled task's training set for fine-tuning and probes: one-object scenes like
val's, class-balanced over the 42 seen pairs (row i shows pair i mod 42), labelled like val.
`shift_noise`, `shift_blur` and `shift_background` re-render val's scenes (same objects, places,
labels, captions and json) under one distribution shift each (SHIFTS), for robustness evaluation in
the manner of ImageNet-C / -R: a model is scored on them exactly as on val.

Every sample is drawn from its own generator seeded by (seed, split, row index), so a sample does
not depend on which worker or which run renders it: same seed and sizes, same bytes.
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from data_prep.pipeline import engine_session, write_dataset
from data_prep.samples import Sample
from data_prep.shards import write_lines

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 205),
    "orange": (250, 140, 20),
    "pink": (250, 135, 195),
    "white": (240, 240, 240),
}
COLOURS_INDEX = {name: i for i, name in enumerate(COLOURS)}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
SIZES = {"small": 0.12, "large": 0.2}  # object radius as a fraction of the image side
HELDOUT_PAIRS = (
    ("blue", "circle"),
    ("yellow", "square"),
    ("purple", "triangle"),
    ("green", "star"),
    ("orange", "cross"),
    ("pink", "diamond"),
)
# split code: part of each sample's seed (a shifted split's scene still comes from val's code;
# its own code seeds only the shift)
SPLITS = {"train": 0, "val": 1, "heldout": 2, "binding": 3, "shift_noise": 4, "shift_blur": 5,
          "shift_background": 6, "labelled": 7}
TEMPLATES = (
    "a {}",
    "a photo of a {}",
    "a {} shape",
    "there is a {}",
    "a small {}",
    "a large {}",
    "a {} on a noisy background",
    "a {} in the center",
)
JPEG_QUALITY = 90

# 3x3 grid cell (row, col) -> (short position name, caption phrase)
_WHERE = {
    (0, 0): ("top left", "in the top left corner"),
    (0, 1): ("top", "at the top"),
    (0, 2): ("top right", "in the top right corner"),
    (1, 0): ("left", "on the left"),
    (1, 1): ("center", "in the center"),
    (1, 2): ("right", "on the right"),
    (2, 0): ("bottom left", "in the bottom left corner"),
    (2, 1): ("bottom", "at the bottom"),
    (2, 2): ("bottom right", "in the bottom right corner"),
}
_ONE_OBJECT = (
    "a {size} {colour} {shape} {where}",
    "a {colour} {shape} {where}",
    "a {colour} {shape}",
    "a photo of a {size} {colour} {shape}",
    "there is a {colour} {shape} {where}",
    "a {size} {colour} {shape} on a noisy background",
)
_TWO_OBJECTS = {
    "horizontal": (
        "there is a {a} and a {b}",
        "a {size_a} {a} on the left and a {size_b} {b} on the right",
        "a {a} to the left of a {b}",
        "a {b} and a {a}",
    ),
    "vertical": (
        "there is a {a} and a {b}",
        "a {size_a} {a} at the top and a {size_b} {b} at the bottom",
        "a {a} above a {b}",
        "a {b} and a {a}",
    ),
}


# the binding split's one caption family: {a} / {b} are "colour shape", first / second object
_BINDING_TEMPLATE = {
    "horizontal": "a {a} on the left and a {b} on the right",
    "vertical": "a {a} at the top and a {b} at the bottom",
}
NEGATIVE_KINDS = ("colour_swap", "shape_swap", "position_swap")


def binding_captions(objects: list, layout: str) -> tuple[str, list[str]]:
    """(true caption, negatives in NEGATIVE_KINDS order) of a two-object binding scene.

    colour_swap: the objects' colours exchanged; shape_swap: their shapes exchanged;
    position_swap: the objects exchanged between the two places."""
    first, second = objects

    def caption(a: tuple, b: tuple) -> str:
        return _articles(_BINDING_TEMPLATE[layout].format(a=" ".join(a), b=" ".join(b)))

    (ca, sa), (cb, sb) = (first["colour"], first["shape"]), (second["colour"], second["shape"])
    negatives = [caption((cb, sa), (ca, sb)), caption((ca, sb), (cb, sa)), caption((cb, sb), (ca, sa))]
    return caption((ca, sa), (cb, sb)), negatives


def _articles(caption: str) -> str:
    """'a orange cross' -> 'an orange cross'."""
    return re.sub(r"\ba (?=[aeiou])", "an ", caption)


def classnames() -> list[str]:
    """The 48 class names, in label order."""
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


def label_of(colour: str, shape: str) -> int:
    return COLOURS_INDEX[colour] * len(SHAPES) + SHAPES.index(shape)


def seen_pairs() -> list[tuple[str, str]]:
    return [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT_PAIRS]


def _unit_outlines() -> dict:
    """Each polygon shape as points on a radius-1 outline, centred on the origin, pointing up."""
    def ring(count, radii, start=-np.pi / 2):
        angles = start + np.arange(count * len(radii)) * (2 * np.pi / (count * len(radii)))
        radius = np.tile(radii, count)
        return np.stack([np.cos(angles) * radius, np.sin(angles) * radius], axis=1)

    arm = 0.34
    cross = [(-arm, -1), (arm, -1), (arm, -arm), (1, -arm), (1, arm), (arm, arm), (arm, 1), (-arm, 1),
             (-arm, arm), (-1, arm), (-1, -arm), (-arm, -arm)]
    return {
        "square": np.array([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]),
        "triangle": ring(3, [1.0]) + np.array([0.0, 0.15]),
        "star": ring(5, [1.0, 0.45]),
        "cross": np.array(cross, dtype=float),
        "diamond": np.array([(0.0, -1.0), (0.7, 0.0), (0.0, 1.0), (-0.7, 0.0)]),
    }


_OUTLINES = _unit_outlines()

# Shift severities: strong enough to hurt a model trained on clean scenes, mild enough that a person
# still names every object's colour and shape.
NOISE_SIGMA = 0.3    # Gaussian pixel noise, standard deviation as a fraction of the 0..255 range (76.5)
BLUR_RADIUS = 0.04   # Gaussian blur radius (PIL's, ~ the standard deviation) per image side: 2.56 px at 64
TEXTURE_PERIOD = (0.06, 0.16)  # stripe width / checker cell per image side: 4 to 10 px at 64


def shift_noise(image: Image.Image, mask: Image.Image, rng) -> Image.Image:
    """Gaussian noise of standard deviation NOISE_SIGMA x 255 on every pixel and channel, clipped."""
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + rng.standard_normal(pixels.shape, dtype=np.float32) * (NOISE_SIGMA * 255)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def shift_blur(image: Image.Image, mask: Image.Image, rng) -> Image.Image:
    """Gaussian blur of radius BLUR_RADIUS x the image side (2.56 px at 64 px)."""
    return image.filter(ImageFilter.GaussianBlur(BLUR_RADIUS * image.width))


def _stripes(x, y, angle, period):
    return np.floor((x * np.cos(angle) + y * np.sin(angle)) / period) % 2


def _checker(x, y, angle, period):
    return (np.floor(x / period) + np.floor(y / period)) % 2


def _gradient(x, y, angle, period):
    along = x * np.cos(angle) + y * np.sin(angle)
    return (along - along.min()) / max(float(along.max() - along.min()), 1e-6)


TEXTURES = {"stripes": _stripes, "checker": _checker, "gradient": _gradient}  # (x, y, angle, period) -> 0..1


def shift_background(image: Image.Image, mask: Image.Image, rng) -> Image.Image:
    """The plain noisy background replaced by a texture train never shows (TEXTURES: stripes at any
    angle, a checkerboard, or a linear gradient) between a dark and a mid-bright tinted grey; the
    objects' pixels (`mask`) are kept as they are."""
    side = image.width
    texture = list(TEXTURES.values())[rng.integers(len(TEXTURES))]
    greys = rng.uniform([0, 110], [60, 170])
    dark, light = (np.clip(g + rng.integers(-25, 26, size=3), 0, 255) for g in greys)
    y, x = np.mgrid[0:side, 0:side].astype(np.float64)
    t = texture(x, y, rng.uniform(0, np.pi), rng.uniform(*TEXTURE_PERIOD) * side)
    pixels = dark + t[..., None] * (light - dark)
    background = Image.fromarray(np.rint(pixels).astype(np.uint8), "RGB")
    return Image.composite(image, background, mask)


# name (`--shifts`) -> transform(clean image, object mask, rng) -> shifted image; split `shift_<name>`
SHIFTS = {"noise": shift_noise, "blur": shift_blur, "background": shift_background}


class SceneRenderer:
    """`(index, row) -> Sample` for one split: draws the scene, writes its caption and metadata.

    A `shift_<name>` split draws val's scene of the same index (val's seed), then applies
    SHIFTS[name] with a generator of its own: the scene, caption and json are val's."""

    def __init__(self, split: str, seed: int, image_size: int):
        self.split = split
        self.shift = SHIFTS[split.removeprefix("shift_")] if split.startswith("shift_") else None
        self.scene_split = "val" if self.shift else split
        self.seed = seed
        self.image_size = image_size
        self.pairs = seen_pairs() if split != "heldout" else list(HELDOUT_PAIRS)

    def __call__(self, index: int, row) -> Sample:
        rng = np.random.default_rng([self.seed, SPLITS[self.scene_split], index])
        if self.split == "binding":
            return self._binding_scene(rng)
        two = self.split == "train" and rng.random() < 0.5
        balanced = self.pairs[index % len(self.pairs)] if self.split == "labelled" else None
        objects, caption = self._two_objects(rng) if two else self._one_object(rng, balanced)
        image = self._draw(rng, objects)
        if self.shift:
            shift_rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
            image = self.shift(image, self._mask(objects), shift_rng)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=JPEG_QUALITY)
        meta = {"objects": objects}
        if self.split != "train":
            obj = objects[0]
            meta.update(obj, label=label_of(obj["colour"], obj["shape"]), classname=f"{obj['colour']} {obj['shape']}")
        return Sample(buffer.getvalue(), _articles(caption), meta)

    def _object(self, rng, pair=None) -> dict:
        colour, shape = pair if pair is not None else self.pairs[rng.integers(len(self.pairs))]
        return {"colour": colour, "shape": shape, "size": "small" if rng.random() < 0.5 else "large"}

    def _radius(self, obj) -> float:
        return SIZES[obj["size"]] * self.image_size

    def _place(self, rng, obj, x_low, x_high, y_low, y_high):
        """Centre uniformly in the box, kept far enough from the edges that the shape stays whole."""
        r, side = self._radius(obj), self.image_size
        x = rng.uniform(max(x_low, r), min(x_high, side - r))
        y = rng.uniform(max(y_low, r), min(y_high, side - r))
        obj["x"], obj["y"] = round(float(x), 2), round(float(y), 2)

    def _one_object(self, rng, pair=None):
        obj = self._object(rng, pair)
        row, col = int(rng.integers(3)), int(rng.integers(3))
        third = self.image_size / 3
        self._place(rng, obj, col * third, (col + 1) * third, row * third, (row + 1) * third)
        obj["position"], phrase = _WHERE[(row, col)]
        template = _ONE_OBJECT[rng.integers(len(_ONE_OBJECT))]
        caption = template.format(size=obj["size"], colour=obj["colour"], shape=obj["shape"], where=phrase)
        return [obj], caption

    def _binding_scene(self, rng) -> Sample:
        """Two objects of different colours and different shapes, the true caption and its swaps."""
        first = self._object(rng)
        others = [(c, s) for c, s in self.pairs if c != first["colour"] and s != first["shape"]]
        colour, shape = others[rng.integers(len(others))]
        second = {"colour": colour, "shape": shape, "size": "small" if rng.random() < 0.5 else "large"}
        layout = self._lay_out(rng, first, second)
        objects = [first, second]
        image = self._draw(rng, objects)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=JPEG_QUALITY)
        caption, negatives = binding_captions(objects, layout)
        meta = {"objects": objects, "layout": layout, "captions": [caption], "negatives": negatives,
                "negative_kinds": list(NEGATIVE_KINDS)}
        return Sample(buffer.getvalue(), caption, meta)

    def _two_objects(self, rng):
        first, second = self._object(rng), self._object(rng)
        layout = self._lay_out(rng, first, second)
        templates = _TWO_OBJECTS[layout]
        caption = templates[rng.integers(len(templates))].format(
            a=f"{first['colour']} {first['shape']}", b=f"{second['colour']} {second['shape']}",
            size_a=first["size"], size_b=second["size"],
        )
        return [first, second], caption

    def _lay_out(self, rng, first: dict, second: dict) -> str:
        """Side by side or one above the other (drawn here): places both objects, returns the layout."""
        layout = "horizontal" if rng.random() < 0.5 else "vertical"
        side, half = self.image_size, self.image_size / 2
        if layout == "horizontal":  # first on the left half, second on the right half
            self._place(rng, first, 0, half - self._radius(first), 0, side)
            self._place(rng, second, half + self._radius(second), side, 0, side)
            first["position"], second["position"] = "left", "right"
        else:
            self._place(rng, first, 0, side, 0, half - self._radius(first))
            self._place(rng, second, 0, side, half + self._radius(second), side)
            first["position"], second["position"] = "top", "bottom"
        return layout

    def _draw(self, rng, objects) -> Image.Image:
        side = self.image_size
        # noisy background: a random dark tint plus uniform per-pixel noise in 0..31; random
        # bytes shifted right are several times faster than bounded integers
        noise = np.frombuffer(rng.bytes(side * side * 3), dtype=np.uint8).reshape(side, side, 3) >> 3
        pixels = noise + rng.integers(25, 90, size=3, dtype=np.uint8)
        image = Image.fromarray(pixels, "RGB")
        draw = ImageDraw.Draw(image)
        for obj in objects:
            jitter = rng.integers(-12, 13, size=3).tolist()
            fill = tuple(min(255, max(0, c + j)) for c, j in zip(COLOURS[obj["colour"]], jitter))
            self._shape(draw, obj, fill)
        return image

    def _mask(self, objects) -> Image.Image:
        """255 on exactly the pixels _draw paints with the objects, 0 on the background."""
        mask = Image.new("L", (self.image_size, self.image_size), 0)
        draw = ImageDraw.Draw(mask)
        for obj in objects:
            self._shape(draw, obj, 255)
        return mask

    def _shape(self, draw, obj, fill) -> None:
        x, y, r = obj["x"], obj["y"], self._radius(obj)
        if obj["shape"] == "circle":
            draw.ellipse((x - 0.9 * r, y - 0.9 * r, x + 0.9 * r, y + 0.9 * r), fill=fill)
        else:
            points = _OUTLINES[obj["shape"]] * r + (x, y)
            draw.polygon([tuple(p) for p in points.tolist()], fill=fill)


def generate(
    out_dir,
    *,
    num_train: int = 20000,
    num_val: int = 2000,
    num_heldout: int | None = None,
    num_binding: int | None = None,
    num_labelled: int | None = None,
    shifts=tuple(SHIFTS),
    image_size: int = 64,
    seed: int = 0,
    shard_size: int = 1000,
    workers: int = 1,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    engine: str = "local",
    ray_address: str | None = None,
) -> dict:
    """Write `out_dir/{train,val,heldout,binding,labelled,shift_*}` shard folders; returns {split: manifest}.

    `num_heldout` and `num_binding` default to num_val // 4; `num_binding=0` writes no binding
    split. `num_labelled` (default num_val; 0: none) is the class-balanced labelled split. `shifts`: names of SHIFTS (or their comma-separated text, "none" for none), each written
    as `shift_<name>` holding val's num_val scenes; empty writes none. classnames.txt and
    templates.txt go beside every split. `engine`, `ray_address`: where the shards are made
    (data_prep.pipeline.write_dataset); `engine="ray"` joins or starts Ray once for all splits.
    """
    from mmssl.errors import UserError

    if image_size < 16:
        raise UserError(f"--image-size must be at least 16 for shapes to be recognisable, got {image_size}")
    sizes = {"train": num_train, "val": num_val, "heldout": num_val // 4 if num_heldout is None else num_heldout}
    for split, count in sizes.items():
        if count < 1:
            raise UserError(f"the {split} split needs at least 1 sample, got {count}")
    binding = num_val // 4 if num_binding is None else num_binding
    if binding < 0:
        raise UserError(f"--num-binding must be 0 (no binding split) or more, got {binding}")
    if binding:
        sizes["binding"] = binding
    labelled = num_val if num_labelled is None else num_labelled
    if labelled < 0:
        raise UserError(f"--num-labelled must be 0 (no labelled split) or more, got {labelled}")
    if labelled:
        sizes["labelled"] = labelled
    if isinstance(shifts, str):  # the --shifts text: comma-separated names, "none" or "" for none
        shifts = [] if shifts.strip().lower() == "none" else [n.strip() for n in shifts.split(",") if n.strip()]
    unknown = [name for name in shifts if name not in SHIFTS]
    if unknown:
        raise UserError(f"--shifts: unknown shift {unknown[0]!r}, expected names from {','.join(SHIFTS)} or none")
    for name in SHIFTS:
        if name in shifts:
            sizes[f"shift_{name}"] = num_val
    manifests = {}
    with engine_session(engine, ray_address):  # --engine ray: one Ray for every split
        for split, count in sizes.items():
            split_dir = Path(out_dir) / split
            source = {"kind": "synthetic", "split": split, "seed": seed, "num_samples": count}
            extra = {"num_classes": len(classnames()), "heldout_pairs": [" ".join(p) for p in HELDOUT_PAIRS]}
            if split == "binding":
                extra["negative_kinds"] = list(NEGATIVE_KINDS)
            if split.startswith("shift_"):
                extra["shift_of"] = "val"
            manifests[split] = write_dataset(
                split_dir, list(range(count)), SceneRenderer(split, seed, image_size),
                source=source, image_size=image_size, shard_size=shard_size, workers=workers,
                resume=resume, overwrite=overwrite, desc=f"synthetic {split}", quiet=quiet, extra=extra,
                engine=engine, ray_address=ray_address,
            )
            write_lines(split_dir / "classnames.txt", classnames())
            write_lines(split_dir / "templates.txt", TEMPLATES)
    return manifests
