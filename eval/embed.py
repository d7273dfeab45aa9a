"""Frozen features for evaluation: load a model, read an eval set, embed it in batches.

One place decides how evaluation touches a model, so zero-shot, retrieval and the linear probe
agree: inference mode, bf16 autocast where the hardware has native bf16 (it roughly halves the
cost of the matrix products; features are cast back to float32 before normalising), L2-normalised
float32 numpy features out. Shards go through `mmssl.data`'s eval loader (corrupt samples skipped
and counted); ImageNet-style class folders through a small torch dataset with the same contract.
The time spent inside the encoders is recorded so benchmarks can report the loader's overhead.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from mmssl.train import policy
from mmssl.errors import UserError
from mmssl.models.refs import checkpoint_ref

FOLDER_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class LoadedModel:
    """A dual encoder ready for evaluation, with what the output JSON says about it."""

    model: torch.nn.Module
    tokenizer: object
    transform: object
    name: str            # architecture, e.g. tiny-vit-64 (CLIP_benchmark's "model")
    pretrained: str      # the checkpoint / weights file, or "random-init" (CLIP_benchmark's "pretrained")
    device: torch.device
    autocast_dtype: Optional[torch.dtype]


@dataclass
class Embedded:
    """Normalised image features of one pass over an eval set, with labels / captions per sample."""

    features: np.ndarray                 # [N, D] float32, unit norm
    labels: Optional[np.ndarray]         # [N] int64, or None when the set has no labels
    captions: list                       # per sample, the list of its captions
    keys: list
    skipped: int                         # corrupt samples skipped
    expected: Optional[int]              # samples the manifest announces (None: unknown)
    encode_seconds: float = 0.0          # time inside model.encode_image
    seconds: float = 0.0                 # wall time of the whole pass (loading included)
    tokens: Optional[torch.Tensor] = None  # [N, T, width] image-tower tokens (`keep_tokens`), for re-ranking


def load_model(checkpoint: str, precision: str = "auto") -> LoadedModel:
    """An mmssl checkpoint (file, or a run folder's checkpoints/latest.pt) or `openclip:NAME[:WEIGHTS]`."""
    import mmssl
    from mmssl.models import image_transform

    ref = checkpoint_ref(checkpoint)
    model = mmssl.create_model(ref).eval()
    device = policy.default_device()
    model.to(device)
    return LoadedModel(
        model=model,
        tokenizer=model.tokenizer,
        transform=image_transform(model, train=False),
        name=getattr(model, "model_name", type(model).__name__),
        pretrained=ref.pretrained,
        device=device,
        autocast_dtype=autocast_dtype(precision, device),
    )


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for an eval `--precision` on this device (None: fp32); see `mmssl.train.policy`."""
    resolved = policy.resolve_precision(precision, device, "--precision")
    note = policy.emulation_note(resolved, device, "--precision")
    if note:
        sys.stderr.write(note + "\n")
    return policy.autocast_dtype(resolved)


def open_eval_data(data: str, transform, batch_size: int = 256, workers: int = 2, allow_remote: bool = False,
                   split: Optional[str] = None):
    """An iterable of `mmssl.data.EvalBatch` over shards (folder with manifest/tars, brace pattern,
    a CLIP_benchmark folder's `split`) or over an ImageNet-style class folder; it exposes
    `corrupt_count` and `num_samples`. Remote shards are read only with `allow_remote` (see
    `mmssl.data.urls`)."""
    from mmssl.data import build_eval_loader
    from mmssl.data.urls import scheme_of

    if _is_class_folder(data):
        if split is not None:
            raise UserError(f"--split {split}: {data} is a class-folder tree; name the split's folder itself")
        return ClassFolderLoader(Path(data), transform, batch_size, workers)
    if "{" not in data and "::" not in data and scheme_of(data) is None and not Path(data).exists():
        raise UserError(f"data not found: {data}")
    return build_eval_loader(data, transform=transform, batch_size=batch_size, num_workers=workers,
                             allow_remote=allow_remote, split=split)


MAX_TOKEN_BYTES = 4 << 30    # image tokens kept for re-ranking: refuse a set that would need more


def embed_images(loaded: LoadedModel, batches, description: str = "images", keep_tokens: bool = False) -> Embedded:
    """Normalised image features of every sample `batches` yields, keeping labels and captions;
    with `keep_tokens` also the image tower's tokens from the same pass (`mmssl.models.tower_tokens`),
    at most MAX_TOKEN_BYTES of them."""
    from mmssl.models.tower_tokens import image_tokens

    features, labels, captions, keys, tokens = [], [], [], [], []
    encode_seconds = 0.0
    start = time.perf_counter()
    expected = getattr(batches, "num_samples", None)
    progress = _progress(expected, description, "img")
    with torch.inference_mode(), precision_context(loaded):
        for batch in batches:
            tick = time.perf_counter()
            images = batch.images.to(loaded.device, non_blocking=True)
            if keep_tokens:
                encoded = image_tokens(loaded.model.visual, images)
                tokens.append(encoded.tokens.cpu())
                _check_token_bytes(tokens, expected or 0)
                encoded = encoded.features
            else:
                encoded = loaded.model.encode_image(images)
            features.append(_normalise(encoded))
            encode_seconds += time.perf_counter() - tick
            labels.append(batch.labels)
            captions.extend(batch.captions)
            keys.extend(batch.keys)
            progress.update(len(batch.keys))
    progress.close()
    if not features:
        raise UserError(f"no usable samples in the data ({batches.corrupt_count} corrupt ones skipped)")
    has_labels = all(label is not None for label in labels)
    return Embedded(
        features=np.concatenate(features),
        labels=torch.cat(labels).numpy() if has_labels else None,
        captions=captions,
        keys=keys,
        skipped=batches.corrupt_count,
        expected=getattr(batches, "num_samples", None),
        encode_seconds=encode_seconds,
        seconds=time.perf_counter() - start,
        tokens=torch.cat(tokens) if keep_tokens else None,
    )


def _check_token_bytes(kept: list, expected: int) -> None:
    per_image = kept[0][0].numel() * kept[0].element_size()
    held = sum(len(part) for part in kept)
    if max(held, expected) * per_image > MAX_TOKEN_BYTES:
        raise UserError(f"re-ranking would keep {max(held, expected)} images' tokens ({per_image} bytes each), "
                        f"over the {MAX_TOKEN_BYTES >> 30} GiB bound: evaluate a smaller set")


def embed_texts(loaded: LoadedModel, texts: Sequence[str], batch_size: int = 256,
                description: str = "texts") -> tuple[np.ndarray, float]:
    """(normalised text features [len(texts), D], seconds inside model.encode_text)."""
    from mmssl.models.factory import require_text_tower

    require_text_tower(loaded.model, "embedding text")
    features, encode_seconds = [], 0.0
    progress = _progress(len(texts), description, "txt")
    with torch.inference_mode(), precision_context(loaded):
        for start in range(0, len(texts), batch_size):
            tokens = loaded.tokenizer(list(texts[start:start + batch_size])).to(loaded.device)
            tick = time.perf_counter()
            features.append(_normalise(loaded.model.encode_text(tokens)))
            encode_seconds += time.perf_counter() - tick
            progress.update(len(tokens))
    progress.close()
    return np.concatenate(features), encode_seconds


def _normalise(encoded: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(encoded.float(), dim=-1).cpu().numpy()


@contextmanager
def evaluation_mode(model: torch.nn.Module):
    """model.eval() for the duration (dropout off), then the caller's train/eval state back:
    periodic validation during training hands us a model in training mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def precision_context(loaded: LoadedModel):
    """bf16 autocast when the loaded model runs in bf16, else a no-op context."""
    enabled = loaded.autocast_dtype is not None
    return torch.autocast(loaded.device.type, dtype=loaded.autocast_dtype or torch.bfloat16, enabled=enabled)


def _progress(total: Optional[int], description: str, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"embedding {description}", unit=unit,
                leave=False, dynamic_ncols=True)


# --- ImageNet-style class folders ------------------------------------------------------------


def _is_class_folder(data: str) -> bool:
    """A folder of class sub-folders (no shards, no manifest, not CLIP_benchmark's webdataset
    layout): torchvision's ImageFolder layout."""
    from mmssl.data.benchmark_layout import NSHARDS_FILE, is_root

    path = Path(data)
    if not path.is_dir() or (path / "manifest.json").exists() or any(path.glob("*.tar")):
        return False
    if is_root(path) or (path / NSHARDS_FILE).is_file():
        return False
    return any(child.is_dir() for child in path.iterdir())


class _FolderImages(torch.utils.data.Dataset):
    """(image tensor or None if corrupt, label, key) per file."""

    def __init__(self, files: list, labels: list, root: Path, transform):
        self.files, self.labels, self.root, self.transform = files, labels, root, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        from PIL import Image

        path = self.files[index]
        try:
            with Image.open(path) as image:
                tensor = self.transform(image.convert("RGB"))
        except Exception:  # an unreadable image is a property of the data: skip and count it
            tensor = None
        return tensor, self.labels[index], str(path.relative_to(self.root))


def _collate_folder(samples: list):
    from mmssl.data import EvalBatch

    good = [sample for sample in samples if sample[0] is not None]
    if not good:
        return None, len(samples)
    images, labels, keys = zip(*good)
    batch = EvalBatch(torch.stack(images), torch.tensor(labels), [[] for _ in good], list(keys))
    return batch, len(samples) - len(good)


class ClassFolderLoader:
    """Batches over `root/<class>/<image>`; classes are the sorted sub-folder names (label = position)."""

    def __init__(self, root: Path, transform, batch_size: int = 256, workers: int = 2):
        self.root = root
        self.classes = sorted(child.name for child in root.iterdir() if child.is_dir())
        files, labels = [], []
        for label, name in enumerate(self.classes):
            found = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in FOLDER_IMAGE_EXTENSIONS)
            files += found
            labels += [label] * len(found)
        if not files:
            raise UserError(f"no images in the class folders of {root}")
        self.dataset = _FolderImages(files, labels, root, transform)
        self.batch_size, self.workers = batch_size, workers
        self.corrupt_count = 0

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterable:
        self.corrupt_count = 0
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, num_workers=self.workers, collate_fn=_collate_folder
        )
        for batch, corrupt in loader:
            self.corrupt_count += corrupt
            if batch is not None:
                yield batch
