"""Classification with a fine-tuned checkpoint's class head (`mmssl finetune`), CLIP_benchmark-shaped.

The head (`mmssl.finetune.objective.ClassHead`, in the checkpoint's `heads["classifier"]`) scores
the image tower's normalised features; its classes are the checkpoint's `finetune.classnames`.
Metrics are the zero-shot ones (top-1, top-5, mean per-class recall, `eval.metrics`), so a
fine-tuned model and its zero-shot start are compared on the same definitions.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from eval.embed import LoadedModel, embed_images, evaluation_mode, open_eval_data
from eval.metrics import classification_metrics
from mmssl.errors import UserError


@dataclass
class SavedClassifier:
    head: torch.nn.Module      # ClassHead, eval mode, on the CPU
    classnames: list


def load_classifier(checkpoint: str, required: bool = True) -> Optional[SavedClassifier]:
    """The class head an mmssl checkpoint saved (`mmssl finetune`); None (or a UserError when
    `required`) for a checkpoint without one."""
    from mmssl.finetune.objective import HEAD, ClassHead
    from mmssl.models.refs import checkpoint_ref, read_checkpoint

    ref = checkpoint_ref(checkpoint)
    payload = read_checkpoint(ref.path) if ref.is_checkpoint else {}
    heads = payload.get("heads") if isinstance(payload.get("heads"), dict) else {}
    state = heads.get(HEAD)
    if state is None:
        if required:
            raise UserError(f"{checkpoint} has no class head: fine-tune it first (mmssl finetune)")
        return None
    config = payload.get("config") if isinstance(payload.get("config"), dict) else {}
    names = (config.get("finetune") or {}).get("classnames")
    weight = state.get("weight") if isinstance(state, dict) else None
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or not isinstance(names, list) \
            or len(names) != weight.shape[0]:
        raise UserError(f"{checkpoint}: its class head does not match its finetune.classnames")
    module = ClassHead(weight.shape[1], weight.shape[0])
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError) as err:
        raise UserError(f"{checkpoint}: unreadable class head ({str(err).splitlines()[0]})") from None
    return SavedClassifier(module.eval(), [str(name) for name in names])


def head_logits(head: torch.nn.Module, features: np.ndarray) -> np.ndarray:
    """[N, C] float32 logits of the head on [N, D] (normalised) image features."""
    with torch.inference_mode():
        return head(torch.from_numpy(np.ascontiguousarray(features))).numpy()


def run_classify(loaded: LoadedModel, classifier: SavedClassifier, data: str, batch_size: int = 256,
                 workers: int = 2, allow_remote: bool = False, split: Optional[str] = None) -> dict:
    """Evaluate the head on one labelled set: {"result": CLIP_benchmark-shaped dict, "logits",
    "labels", "embedded"}."""
    start = time.perf_counter()
    batches = open_eval_data(data, loaded.transform, batch_size, workers, allow_remote, split)
    with evaluation_mode(loaded.model):
        embedded = embed_images(loaded, batches)
    if embedded.labels is None:
        raise UserError(f"{data}: samples carry no 'label' in their json; classification needs labels")
    num_classes = len(classifier.classnames)
    if embedded.labels.min() < 0 or embedded.labels.max() >= num_classes:
        raise UserError(f"{data}: label {int(embedded.labels.max())} out of range for the head's {num_classes} classes")
    logits = head_logits(classifier.head, embedded.features)
    result = {
        "dataset": data,
        "model": loaded.name,
        "pretrained": loaded.pretrained,
        "task": "classification",
        "metrics": classification_metrics(logits, embedded.labels),
        "language": "en",
        "num_samples": len(embedded.labels),
        "num_skipped": embedded.skipped,
        "num_classes": num_classes,
    }
    return {"result": result, "logits": logits, "labels": embedded.labels, "embedded": embedded,
            "seconds": time.perf_counter() - start}
