"""Turn query texts and images into unit vectors with the model the index was built with.

Why a fixed seed: an index may be built with a randomly initialised model (`openclip:NAME`
without weights, as in tests and benchmarks); the process that later embeds queries must build
the very same weights, so every model load here happens under torch seed 0. Models with weights
are unaffected. Loading goes through `eval.embed.load_model`, so the index and the eval commands
accept the same `--checkpoint` forms and run at the same precision.
"""
from __future__ import annotations

import io
import threading
from collections import OrderedDict

import numpy as np

from mmssl.errors import UserError

MODEL_SEED = 0
TEXT_CACHE_SIZE = 4096


def load_query_model(checkpoint: str):
    """`eval.embed.LoadedModel` for a checkpoint reference, built under a fixed torch seed."""
    import torch

    from eval.embed import load_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(MODEL_SEED)
        return load_model(checkpoint)


def decode_image(data: bytes):
    """PIL RGB image from encoded bytes; UserError for anything that is not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise UserError("not a readable image") from None


class QueryEncoder:
    """Thread-safe text and image embedding for queries, with an LRU cache of text embeddings.

    One lock around the model: concurrent forward passes on a CPU only fight over the same cores,
    and callers that want throughput batch their queries instead (see `eval.serve`).
    """

    def __init__(self, loaded, cache_size: int = TEXT_CACHE_SIZE):
        self.loaded = loaded
        self.cache_size = cache_size
        self.cache_hits = 0
        self.cache_misses = 0
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
                self._cache[text] = vector
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _encode_text_batch(self, texts: list[str]) -> np.ndarray:
        import torch

        from eval.embed import precision_context

        loaded = self.loaded
        with self._model_lock, torch.inference_mode(), precision_context(loaded):
            tokens = loaded.tokenizer(list(texts)).to(loaded.device)
            features = loaded.model.encode_text(tokens)
            return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()

    def encode_images(self, images: list) -> np.ndarray:
        """[len(images), D] float32 unit rows for PIL images."""
        import torch

        from eval.embed import precision_context

        loaded = self.loaded
        batch = torch.stack([loaded.transform(image) for image in images]).to(loaded.device)
        with self._model_lock, torch.inference_mode(), precision_context(loaded):
            features = loaded.model.encode_image(batch)
            return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()
