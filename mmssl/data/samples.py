"""Raw samples out of tar shards, and decoding them into (image tensor, caption, key).

Raw samples stay undecoded bytes for as long as possible: shuffling and fast-forwarding (resume)
happen on bytes, so a skipped sample costs a tar read, never a JPEG decode. Decoding is where bad
data shows up (a truncated JPEG, a sample without caption, an image whose header declares a pixel
bomb or a sliver the resize would blow up: see `mmssl.data.image_guard`); `SampleDecoder` raises
`CorruptSample` for those and the loaders count, log and skip them instead of crashing a run.
"""
from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass
from itertools import islice
from typing import Callable, Iterable, Iterator, Optional

from mmssl.data.benchmark_layout import benchmark_captions
from mmssl.data.image_batch import BatchedImageTransform
from mmssl.data.image_guard import SHARD_LIMITS, admit_image
from mmssl.data.tar_reader import tar_samples

logger = logging.getLogger("mmssl.data")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_LOGGED_PER_PROCESS = 20  # corrupt samples logged one by one per process; the rest are only counted


class CorruptSample(Exception):
    """A sample that cannot be used (undecodable image, no caption); skipped and counted."""


@dataclass(frozen=True)
class LostSamples:
    """Stands in the raw stream for samples a shard should have held but did not yield (a
    truncated or unreadable shard, or one shorter than its manifest says); loaders count them
    as corrupt."""

    count: int
    url: str


def shard_samples(url: str, start: int = 0, stop: Optional[int] = None) -> Iterator[dict | LostSamples]:
    """Raw samples `start:stop` of one shard (`__key__`, `__url__`, and bytes per extension).

    A shard that cannot be opened or read is logged and ends early; when `stop` is known, the
    samples it lacks are announced by one `LostSamples` item, and the loaders count them as
    corrupt and make them up like corrupt ones.
    """
    produced = 0
    try:
        for raw in islice(tar_samples(url), start, stop):
            produced += 1
            yield raw
    except (OSError, ValueError) as err:
        logger.warning("skipping unreadable rest of shard %s: %s", url, err)
    if stop is not None and produced < stop - start:
        yield LostSamples(stop - start - produced, url)


def segment_samples(segments: Iterable[tuple[str, int, Optional[int]]]) -> Iterator[dict | LostSamples]:
    """Raw samples of consecutive (url, start, stop) shard segments."""
    for url, start, stop in segments:
        yield from shard_samples(url, start, stop)


class SampleDecoder:
    """Raw sample -> (image, caption, key), or CorruptSample; `images.batch` makes the batch tensor.

    `decode_size` lets PIL decode a JPEG at a reduced DCT scale that still covers that size on
    both sides: much cheaper for large images, and exact enough for resize + center crop (leave it
    None when random-resized-crop augmentation wants the full resolution).
    Captions come from `.txt`; when the json carries a `captions` list (COCO-style shards), one is
    picked per sample and epoch by a hash of (seed, epoch, key): deterministic, and it varies
    across epochs. `captions=False` (image-only objectives) reads no caption and returns None for
    it; `views` (a `mmssl.data.views.TwoViews`) adds the sample's two augmented views. `labels=True`
    (fine-tuning on labelled shards) returns the sample's class label (`eval_targets`: json `label`
    or `.cls`) in the caption's place; a sample without one is corrupt.
    """

    def __init__(self, transform: Callable, decode_size: Optional[int] = None, seed: int = 0,
                 captions: bool = True, views=None, labels: bool = False):
        self.images = BatchedImageTransform(transform)
        self.decode_size = decode_size
        self.seed = seed
        self.captions = captions and not labels
        self.labels = labels
        self.views = views
        self.corrupt = 0

    def __call__(self, raw: dict, epoch: int = 0):
        """(image tensor, caption or label, key) for training, plus (view 1, view 2) when `views` is set."""
        caption = self.guarded(raw, self.caption, raw, epoch) if self.captions else None
        if self.labels:
            caption = self.guarded(raw, self.label, raw)
        key = raw.get("__key__")
        if self.views is None:
            return self.guarded(raw, self.image, raw), caption, key
        decoded = self.guarded(raw, self.decoded, raw)
        image = self.guarded(raw, self.images.sample, decoded)
        return image, caption, key, self.guarded(raw, self.views.sample, decoded, epoch, key)

    def guarded(self, raw: dict, function: Callable, *args):
        """function(*args), with any failure logged and turned into CorruptSample."""
        try:
            return function(*args)
        except Exception as err:  # any failure to decode is a property of the data, not a bug
            self.corrupt += 1
            if self.corrupt <= _LOGGED_PER_PROCESS:
                logger.warning("skipping corrupt sample %s in %s: %s", raw.get("__key__"), raw.get("__url__"), err)
            raise CorruptSample(raw.get("__key__")) from err

    def image(self, raw: dict):
        return self.images.sample(self.decoded(raw))

    def decoded(self, raw: dict):
        """The sample's image, admitted (`mmssl.data.image_guard`) and decoded to PIL."""
        data = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
        if data is None:
            raise CorruptSample("no image file")
        return admit_image(data, SHARD_LIMITS, self.decode_size)

    def label(self, raw: dict) -> int:
        label, _ = eval_targets(raw)
        if label is None:
            raise CorruptSample("no class label (json 'label' or .cls)")
        return label

    def caption(self, raw: dict, epoch: int) -> str:
        meta = raw.get("json")
        if meta is not None and b'"captions"' in meta:
            captions = json.loads(meta).get("captions")
            if captions:
                index = zlib.crc32(f"{self.seed}:{epoch}:{raw['__key__']}".encode()) % len(captions)
                return str(captions[index])
        text = raw.get("txt")
        if text is None:
            raise CorruptSample("no caption (.txt or json captions)")
        return text.decode("utf-8").strip()


def sample_meta(raw: dict) -> dict:
    """A raw sample's `.json` member parsed ({} without one); anything but a JSON object is an error."""
    meta = json.loads(raw["json"]) if "json" in raw else {}
    if not isinstance(meta, dict):
        raise ValueError(f"the json member is a {type(meta).__name__}, not an object")
    return meta


def eval_targets(raw: dict, caption_lines: bool = False,
                 meta: Optional[dict] = None) -> tuple[Optional[int], list[str]]:
    """The label (json `label`, else `.cls` as webdataset writes it, else None) and every caption
    of a raw sample, for evaluation. `caption_lines`: the `.txt` holds one caption per line
    (CLIP_benchmark's layout, `mmssl.data.benchmark_layout`); otherwise it is one caption.
    `meta`: the sample's json already parsed (`sample_meta`), else it is parsed here.

    A sample with neither is unusable: CorruptSample."""
    meta = sample_meta(raw) if meta is None else meta
    captions = [str(c) for c in meta.get("captions") or []]
    if not captions and "txt" in raw:
        captions = benchmark_captions(raw["txt"]) if caption_lines else [raw["txt"].decode("utf-8").strip()]
    label = meta.get("label")
    if label is None and "cls" in raw:
        label = _class_label(raw["cls"])
    if label is None and not captions:
        raise CorruptSample("no label and no caption")
    return (None if label is None else int(label)), captions


def _class_label(data: bytes) -> int:
    """A `.cls` member: a whole number as ASCII text (anything else makes the sample corrupt)."""
    text = data.strip()
    if not (text.isdigit() and len(text) <= 9):
        raise CorruptSample(f"not a class label: {text[:20]!r}")
    return int(text)
