"""Zero-shot image-text retrieval over a captioned set (several captions per image, COCO-style).

Every image is embedded once and every caption once; caption j remembers its image
(`text_to_image`), and `eval.metrics.retrieval_metrics` ranks both ways in memory-bounded chunks.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np

from eval.embed import LoadedModel, embed_images, embed_texts, evaluation_mode, open_eval_data
from eval.metrics import retrieval_metrics
from mmssl.errors import UserError


def run_retrieval(loaded: LoadedModel, data: str, batch_size: int = 256, workers: int = 2,
                  ks=(1, 5, 10), allow_remote: bool = False, split: Optional[str] = None,
                  rerank_head=None, rerank_k: int = 16) -> dict:
    """Evaluate one captioned set (`split`: of a CLIP_benchmark folder); returns {"result":
    CLIP_benchmark-shaped dict, "embedded", "text_features", "seconds", "model_seconds"}.

    With `rerank_head` (a trained ITM head, `mmssl.heads.saved.load_head`) each query's cosine top
    `rerank_k` is reordered by the head (`eval.rerank`): `metrics` are the re-ranked ones and
    `rerank.before` the cosine ones."""
    with evaluation_mode(loaded.model):
        return _run_retrieval(loaded, data, batch_size, workers, ks, allow_remote, split, rerank_head, rerank_k)


def _run_retrieval(loaded, data, batch_size, workers, ks, allow_remote, split, rerank_head, rerank_k) -> dict:
    start = time.perf_counter()
    batches = open_eval_data(data, loaded.transform, batch_size, workers, allow_remote, split)
    embedded = embed_images(loaded, batches, keep_tokens=rerank_head is not None)
    captionless = sum(1 for captions in embedded.captions if not captions)
    if captionless:
        raise UserError(f"{data}: {captionless} of {len(embedded.keys)} samples have no caption; retrieval needs captions")
    texts = [caption for captions in embedded.captions for caption in captions]
    text_to_image = np.repeat(np.arange(len(embedded.captions)), [len(c) for c in embedded.captions])
    text_features, text_seconds = embed_texts(loaded, texts, batch_size)
    metrics = retrieval_metrics(embedded.features, text_features, text_to_image, ks=ks)
    rerank = None
    if rerank_head is not None:
        from eval.rerank import ItmPairScorer, rerank_retrieval

        tick = time.perf_counter()
        scorer = ItmPairScorer(loaded, rerank_head, embedded.tokens, texts)
        rerank = {"scorer": "itm", "k": rerank_k, "before": metrics}
        metrics = rerank_retrieval(embedded.features, text_features, text_to_image, scorer, rerank_k, ks)
        rerank["seconds"] = round(time.perf_counter() - tick, 3)
    result = {
        "dataset": data,
        "model": loaded.name,
        "pretrained": loaded.pretrained,
        "task": "zeroshot_retrieval",
        "metrics": metrics,
        "language": "en",
        "num_samples": len(embedded.keys),
        "num_captions": len(texts),
        "num_skipped": embedded.skipped,
    }
    if rerank is not None:
        result["rerank"] = rerank
    return {
        "result": result, "embedded": embedded, "text_features": text_features,
        "seconds": time.perf_counter() - start, "model_seconds": embedded.encode_seconds + text_seconds,
    }
