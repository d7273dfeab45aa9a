"""Zero-shot classification: class names + prompt templates -> text classifier -> FAISS scoring.

The classifier is built the CLIP_benchmark way: every prompt's text embedding is normalised, the
prompts of a class are averaged, and the average is renormalised (so each class is one unit
vector, however many templates). Images are scored against the classes with a FAISS inner-product
index over those unit vectors -- the same exact search the retrieval index uses.
"""
from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from eval.embed import Embedded, LoadedModel, embed_images, evaluation_mode, open_eval_data, precision_context
from eval.metrics import classification_metrics, per_class_counts
from eval.templates import Template, load_classnames, load_templates
from mmssl.data.benchmark_layout import CLASSNAMES_FILE
from mmssl.errors import UserError


def build_classifier(model, tokenizer, classnames: Sequence[str], templates: Sequence[Template],
                     batch_size: int = 256) -> torch.Tensor:
    """[embed_dim, num_classes] float32 class weights, unit norm per column.

    `templates` are functions of the class name (open_clip's metadata style) or format strings
    with `{}`. Runs under the caller's autocast / inference mode; weights come back float32 on CPU.
    """
    if not classnames or not templates:
        raise ValueError("build_classifier needs at least one class name and one template")
    prompts = class_prompt_texts(classnames, templates)
    encoded = []
    with torch.inference_mode():
        device = next(model.parameters()).device
        for start in range(0, len(prompts), batch_size):
            tokens = tokenizer(prompts[start:start + batch_size]).to(device)
            encoded.append(torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    per_prompt = torch.cat(encoded).view(len(classnames), len(templates), -1)
    return torch.nn.functional.normalize(per_prompt.mean(dim=1), dim=-1).T.contiguous()


def zeroshot_logits(image_features: np.ndarray, classifier) -> np.ndarray:
    """[N, C] cosine scores via a FAISS IndexFlatIP of the class vectors (all classes searched)."""
    import faiss

    classes = np.ascontiguousarray(np.asarray(classifier, dtype=np.float32).T)
    index = faiss.IndexFlatIP(classes.shape[1])
    index.add(classes)
    scores, ids = index.search(np.ascontiguousarray(image_features, dtype=np.float32), len(classes))
    logits = np.empty_like(scores)
    np.put_along_axis(logits, ids, scores, axis=1)
    return logits


def run_zeroshot(loaded: LoadedModel, data: str, classnames_spec: Optional[str] = None,
                 templates_spec: Optional[str] = None, batch_size: int = 256, workers: int = 2,
                 allow_remote: bool = False, split: Optional[str] = None) -> dict:
    """Evaluate one labelled set; returns {"result": CLIP_benchmark-shaped dict, "logits", "labels",
    "classnames", "embedded", "seconds", "model_seconds"}. `split`: of a CLIP_benchmark folder,
    whose classnames.txt and zeroshot_classification_templates.txt are then the defaults."""
    with evaluation_mode(loaded.model):
        return _run_zeroshot(loaded, data, classnames_spec, templates_spec, batch_size, workers, allow_remote,
                             split)


def _run_zeroshot(loaded, data, classnames_spec, templates_spec, batch_size, workers, allow_remote, split) -> dict:
    batches = open_eval_data(data, loaded.transform, batch_size, workers, allow_remote, split)
    classnames, templates = class_prompts(data, batches, classnames_spec, templates_spec)

    start = time.perf_counter()
    with precision_context(loaded):
        classifier = build_classifier(loaded.model, loaded.tokenizer, classnames, templates, batch_size)
    classifier_seconds = time.perf_counter() - start
    embedded = embed_images(loaded, batches)
    labels = _require_labels(embedded, len(classnames), data)
    logits = zeroshot_logits(embedded.features, classifier)
    metrics = classification_metrics(logits, labels)
    result = {
        "dataset": data,
        "model": loaded.name,
        "pretrained": loaded.pretrained,
        "task": "zeroshot_classification",
        "metrics": metrics,
        "language": "en",
        "num_samples": len(labels),
        "num_skipped": embedded.skipped,
        "num_classes": len(classnames),
        "num_templates": len(templates),
    }
    seconds = time.perf_counter() - start
    return {
        "result": result, "logits": logits, "labels": labels, "classnames": classnames, "embedded": embedded,
        "seconds": seconds, "model_seconds": classifier_seconds + embedded.encode_seconds,
    }


def class_prompts(data: str, batches, classnames_spec: Optional[str] = None,
                  templates_spec: Optional[str] = None) -> tuple[list[str], list[Template]]:
    """(class names, templates) of a labelled set opened by `open_eval_data`: the specs when given,
    else a CLIP_benchmark folder's files, else the data folder's classnames.txt / templates.txt,
    else a class-folder tree's folder names and OpenAI's templates."""
    benchmark = getattr(batches, "benchmark", None)
    data_dir = None if benchmark else _data_folder(data)
    names = benchmark.classnames() if benchmark and not classnames_spec else None
    if benchmark and not classnames_spec and names is None:
        raise UserError(f"{data}: no {CLASSNAMES_FILE} in {benchmark.root}; pass --classnames FILE")
    classnames = load_classnames(classnames_spec, data_dir, getattr(batches, "classes", ()), defaults=names)
    prompts = benchmark.templates() if benchmark and not templates_spec else None
    return classnames, load_templates(templates_spec, data_dir, defaults=prompts)


def write_per_class(path: Path, logits: np.ndarray, labels: np.ndarray, classnames: Sequence[str]) -> None:
    """CSV: class_id, classname, support, correct, recall (top-1) for every class."""
    correct, support = per_class_counts(logits.argmax(axis=1), labels, len(classnames))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class_id", "classname", "support", "correct", "recall"])
        for class_id, name in enumerate(classnames):
            recall = f"{correct[class_id] / support[class_id]:.6f}" if support[class_id] else ""
            writer.writerow([class_id, name, int(support[class_id]), int(correct[class_id]), recall])


def write_confusion(path: Path, logits: np.ndarray, labels: np.ndarray, classnames: Sequence[str]) -> None:
    """Row-normalised confusion matrix (true class rows, predicted class columns) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_classes = len(classnames)
    counts = np.zeros((num_classes, num_classes))
    np.add.at(counts, (labels, logits.argmax(axis=1)), 1)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(4 + 0.18 * num_classes, 30)
    figure, axes = plt.subplots(figsize=(side, side))
    image = axes.imshow(rates, cmap="viridis", vmin=0, vmax=1)
    if num_classes <= 100:
        axes.set_xticks(range(num_classes), classnames, rotation=90, fontsize=6)
        axes.set_yticks(range(num_classes), classnames, fontsize=6)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def class_prompt_texts(classnames: Sequence[str], templates: Sequence[Template]) -> list[str]:
    """Every class x template prompt, class-major (the order build_classifier averages over)."""
    return [template(name) if callable(template) else template.replace("{}", name)
            for name in classnames for template in templates]


def _data_folder(data: str) -> Optional[Path]:
    """The folder whose classnames.txt / templates.txt apply: the data folder, or a pattern's folder."""
    path = Path(data.split("::")[0])
    if "{" in path.name or path.suffix == ".tar":
        path = path.parent
    return path if path.is_dir() else None


def _require_labels(embedded: Embedded, num_classes: int, data: str) -> np.ndarray:
    if embedded.labels is None:
        raise UserError(f"{data}: samples carry no 'label' in their json; zero-shot classification needs labels")
    top = int(embedded.labels.max())
    if embedded.labels.min() < 0 or top >= num_classes:
        raise UserError(f"{data}: label {top} out of range for {num_classes} class names")
    return embedded.labels
