"""Turn query texts and images into unit vectors with the model the index was built with.

Queries come from anyone, so their cost is bounded before the model sees them: a text longer than
`MAX_TEXT_CHARS` is refused (CLIP's tokenizer keeps 77 tokens anyway, while tokenizing megabytes
takes seconds), an image goes through `mmssl.data.image_guard` (format, sides, pixels, aspect)
before it is decoded, and the text-embedding cache is bounded in bytes as well as in entries.

Why a fixed seed: an index may be built with a randomly initialised model (`openclip:NAME`
without weights, as in tests and benchmarks); the process that later embeds queries must build
the very same weights, so every model load here happens under torch seed 0. Models with weights
are unaffected. Loading goes through `eval.embed.load_model`, so the index and the eval commands
accept the same `--checkpoint` forms and run at the same precision.
"""
from __future__ import annotations

import sys
import threading
from collections import OrderedDict

import numpy as np

from mmssl.errors import UserError

MODEL_SEED = 0
TEXT_CACHE_SIZE = 4096               # entries
TEXT_CACHE_BYTES = 32 * 2**20        # keys (sys.getsizeof) plus vectors
MAX_TEXT_CHARS = 1000


def load_query_model(checkpoint: str):
    """`eval.embed.LoadedModel` for a checkpoint reference, built under a fixed torch seed."""
    import torch

    from eval.embed import load_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(MODEL_SEED)
        return load_model(checkpoint)


def check_text_query(text: str, max_chars: int = MAX_TEXT_CHARS) -> str:
    """The text, or UserError when it is longer than max_chars characters."""
    if len(text) > max_chars:
        raise UserError(f"text is {len(text)} characters; the limit is {max_chars} (--max-text-chars)")
    return text


def input_size(transform) -> int | None:
    """The side of the square the model's transform produces (its crop or resize size), if visible."""
    for step in reversed(getattr(transform, "transforms", [])):
        size = getattr(step, "size", None)
        if isinstance(size, int):
            return size
        if isinstance(size, (tuple, list)) and size and all(isinstance(side, int) for side in size):
            return max(size)
    return None


class QueryEncoder:
    """Thread-safe text and image embedding for queries, with an LRU cache of text embeddings.

    One lock around the model: concurrent forward passes on a CPU only fight over the same cores,
    and callers that want throughput batch their queries instead (see `eval.serve`). The cache
    holds at most `cache_size` entries and `cache_bytes` bytes (key plus vector).
    """

    def __init__(self, loaded, cache_size: int = TEXT_CACHE_SIZE, cache_bytes: int = TEXT_CACHE_BYTES):
        self.loaded = loaded
        self.cache_size = cache_size
        self.cache_bytes = cache_bytes
        self.cache_bytes_used = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self.input_size = input_size(loaded.transform)
        self._model_lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    @classmethod
    def from_checkpoint(cls, checkpoint: str) -> "QueryEncoder":
        return cls(load_query_model(checkpoint))

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """[len(texts), D] float32 unit rows; cached texts skip the model, the rest go in one batch."""
        found = self._cache_lookup(texts)
        missing = list(dict.fromkeys(text for text in texts if text not in found))
        if missing:
            fresh = self._encode_text_batch(missing)
            self._cache_store(missing, fresh)
            found.update(zip(missing, fresh))
        return np.stack([found[text] for text in texts])

    def _cache_lookup(self, texts: list[str]) -> dict:
        found = {}
        with self._cache_lock:
            for text in texts:
                if text in self._cache:
                    self._cache.move_to_end(text)
                    found[text] = self._cache[text]
            self.cache_hits += sum(text in found for text in texts)
            self.cache_misses += sum(text not in found for text in texts)
        return found

    def _cache_store(self, texts: list[str], vectors: np.ndarray) -> None:
        with self._cache_lock:
            for text, vector in zip(texts, vectors):
                cost = _entry_bytes(text, vector)
                if cost > self.cache_bytes:
                    continue
                old = self._cache.pop(text, None)
                if old is not None:
                    self.cache_bytes_used -= _entry_bytes(text, old)
                self._cache[text] = vector.copy()      # a row view would keep its whole batch alive
                self.cache_bytes_used += cost
            while len(self._cache) > self.cache_size or self.cache_bytes_used > self.cache_bytes:
                text, vector = self._cache.popitem(last=False)
                self.cache_bytes_used -= _entry_bytes(text, vector)

    def _encode_text_batch(self, texts: list[str]) -> np.ndarray:
        import torch

        from mmssl.models.factory import require_text_tower

        require_text_tower(self.loaded.model, "a text query")

        from eval.embed import precision_context

        loaded = self.loaded
        with self._model_lock, torch.inference_mode(), precision_context(loaded):
            tokens = loaded.tokenizer(list(texts)).to(loaded.device)
            features = loaded.model.encode_text(tokens)
            return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()

    def prepare_image(self, data: bytes, limits=None):
        """Encoded image bytes -> the model's input tensor, through the admission checks
        (`mmssl.data.image_guard.ImageRefused` when refused). Small: safe to queue."""
        from mmssl.data.image_guard import ImageLimits, admit_image

        return self.loaded.transform(admit_image(data, limits or ImageLimits(), self.input_size))

    def encode_images(self, images: list) -> np.ndarray:
        """[len(images), D] float32 unit rows for PIL images or tensors from `prepare_image`."""
        import torch

        from eval.embed import precision_context

        loaded = self.loaded
        inputs = [image if isinstance(image, torch.Tensor) else loaded.transform(image) for image in images]
        batch = torch.stack(inputs).to(loaded.device)
        with self._model_lock, torch.inference_mode(), precision_context(loaded):
            features = loaded.model.encode_image(batch)
            return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()


def _entry_bytes(text: str, vector: np.ndarray) -> int:
    return sys.getsizeof(text) + vector.nbytes
