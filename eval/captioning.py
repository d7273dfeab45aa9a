"""Captioning: generate a caption per image with the checkpoint's caption head, score it against
every reference caption of the image with BLEU-4 and CIDEr (pycocoevalcap's `Bleu(4)` and `Cider`,
as COCO captioning and CLIP_benchmark report them).

References are each sample's captions (json `captions` list, else its .txt). Text is normalised
the simple way before scoring (lowercase, punctuation to spaces, whitespace collapsed) instead of
the Java PTB tokenizer COCO uses, so scores run anywhere; on plain English captions the two differ
only in details such as contractions. CIDEr here is pycocoevalcap's CIDEr-D (document frequencies
from the references of the evaluated set itself), in its own scale (x10 of the per-n-gram cosine).
"""
from __future__ import annotations

import re
import time
from typing import Optional

from eval.embed import LoadedModel, evaluation_mode, open_eval_data, precision_context
from mmssl.errors import UserError

TASK = "captioning"


def normalise(text: str) -> str:
    """lowercase, punctuation -> spaces, single spaces."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def caption_metrics(hypotheses: dict, references: dict) -> dict:
    """{"bleu4", "cider"} of `hypotheses` (key -> caption) against `references` (key -> [captions])."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if not hypotheses or set(hypotheses) != set(references):
        raise ValueError("hypotheses and references must cover the same, non-empty set of keys")
    res = {key: [normalise(text)] for key, text in hypotheses.items()}
    gts = {key: [normalise(text) for text in texts] for key, texts in references.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


def run_captioning(loaded: LoadedModel, data: str, checkpoint: Optional[str] = None, beams: int = 1,
                   max_tokens: int = 20, batch_size: int = 64, workers: int = 2, allow_remote: bool = False,
                   split: Optional[str] = None) -> dict:
    """Caption every image of `data` and score; returns {"result": CLIP_benchmark-shaped dict,
    "captions": key -> generated caption, "references": key -> [captions], "seconds"}."""
    from mmssl.captioning import caption_batches
    from mmssl.heads.saved import load_head

    head = load_head(checkpoint or loaded.pretrained, "caption", loaded.model)
    start = time.perf_counter()
    batches = open_eval_data(data, loaded.transform, batch_size, workers, allow_remote, split)
    references: dict = {}

    def pairs():
        for batch in batches:
            for key, captions in zip(batch.keys, batch.captions):
                references[key] = [text for text in captions if isinstance(text, str) and text.strip()]
            keep = [row for row, key in enumerate(batch.keys) if references[key]]
            if keep:
                yield batch.images[keep], [batch.keys[row] for row in keep]

    with evaluation_mode(loaded.model):
        captions = dict(caption_batches(loaded.model, head, pairs(), beams, max_tokens,
                                        total=getattr(batches, "num_samples", None),
                                        precision=lambda: precision_context(loaded)))
    if not captions:
        raise UserError(f"{data}: no images with a reference caption ({batches.corrupt_count} corrupt samples "
                        "skipped)")
    references = {key: references[key] for key in captions}
    metrics = caption_metrics(captions, references)
    metrics["num_images"] = len(captions)
    result = {
        "dataset": data,
        "model": loaded.name,
        "pretrained": loaded.pretrained,
        "task": TASK,
        "metrics": metrics,
        "language": "en",
        "beams": beams,
        "max_tokens": max_tokens,
    }
    return {"result": result, "captions": captions, "references": references,
            "seconds": time.perf_counter() - start}
