"""Image-caption selection: for every image, does the true caption outscore its hard negatives?

Each sample's true caption is its first caption (json `captions`, else its .txt) and its json lists
the hard negatives (`negatives`) and, optionally, what each one is (`negative_kinds`, aligned with
`negatives`, e.g. colour_swap / shape_swap / position_swap in the synthetic world's `binding/`
split). Negatives live apart from `captions` so that retrieval on the same shards sees only true
captions. An image is
correct when the true caption scores strictly above every negative (a tie is wrong); per kind,
`acc_<kind>` is the fraction of (image, negative of that kind) pairs the true caption wins.

A scorer is one function, `score_pairs(loaded, images [B, 3, H, W], tokens [B, K, L]) -> [B, K]`
scores (higher: a better match); `SCORERS` maps a name to a builder `(checkpoint, loaded) ->
score_pairs`. "cosine" is the dual encoder's normalised image . text similarity; "itm" is an
image-text matching head's score, built by `mmssl.heads.itm_scoring.build_itm_scorer`; "caption"
the caption decoder's log-likelihood of the caption (CoCa's way of scoring).
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable, Optional

import numpy as np
import torch

from eval.embed import LoadedModel, _progress, evaluation_mode, open_eval_data, precision_context
from mmssl.errors import UserError

TASK = "image_caption_selection"
MAX_NEGATIVES = 64          # per sample: every one is tokenized and scored against its image
ScorePairs = Callable[[LoadedModel, torch.Tensor, torch.Tensor], torch.Tensor]


def cosine_scores(loaded: LoadedModel, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[B, K] cosine similarity of each image with each of its K captions (one encoder pass each)."""
    batch, count, length = tokens.shape
    image_features = torch.nn.functional.normalize(loaded.model.encode_image(images).float(), dim=-1)
    text_features = loaded.model.encode_text(tokens.reshape(batch * count, length)).float()
    text_features = torch.nn.functional.normalize(text_features, dim=-1).view(batch, count, -1)
    return torch.einsum("bd,bkd->bk", image_features, text_features)


def _cosine(checkpoint: str, loaded: LoadedModel) -> ScorePairs:
    from mmssl.models.factory import require_text_tower

    require_text_tower(loaded.model, "mmssl eval caption-selection --scorer cosine")
    return cosine_scores


def _itm(checkpoint: str, loaded: LoadedModel) -> ScorePairs:
    from mmssl.heads.itm_scoring import build_itm_scorer

    return build_itm_scorer(checkpoint, loaded)


def _caption(checkpoint: str, loaded: LoadedModel) -> ScorePairs:
    """CoCa's scoring: the caption decoder's log-likelihood of each caption given the image."""
    from mmssl.heads.saved import load_head
    from mmssl.models.tower_tokens import image_tokens

    head = load_head(checkpoint, "caption", loaded.model)

    def score(loaded: LoadedModel, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        rows, captions, length = tokens.shape
        image = image_tokens(loaded.model, images).tokens
        index = torch.arange(rows, device=images.device).repeat_interleave(captions)
        return head.log_likelihood(loaded.model, image, tokens.reshape(rows * captions, length),
                                   index).reshape(rows, captions)

    return score


SCORERS: dict[str, Callable[[str, LoadedModel], ScorePairs]] = {"cosine": _cosine, "itm": _itm, "caption": _caption}


def run_caption_selection(loaded: LoadedModel, data: str, scorer: str = "cosine", checkpoint: Optional[str] = None,
                          batch_size: int = 256, workers: int = 2, allow_remote: bool = False,
                          split: Optional[str] = None, score_pairs: Optional[ScorePairs] = None) -> dict:
    """Score one set whose samples carry a caption and a json `negatives` list; returns {"result": CLIP_benchmark-
    shaped dict, "scores": per image its [K] scores (numpy), "kinds", "keys", "seconds"}.
    `score_pairs` overrides the `scorer` registry entry (tests, callers with their own scorer)."""
    if score_pairs is None:
        if scorer not in SCORERS:
            raise UserError(f"unknown scorer {scorer!r}; choose one of {', '.join(SCORERS)}")
        score_pairs = SCORERS[scorer](checkpoint or loaded.pretrained, loaded)
    with evaluation_mode(loaded.model):
        return _run(loaded, data, scorer, score_pairs, batch_size, workers, allow_remote, split)


def _run(loaded, data, scorer, score_pairs, batch_size, workers, allow_remote, split) -> dict:
    start = time.perf_counter()
    batches = open_eval_data(data, loaded.transform, batch_size, workers, allow_remote, split)
    all_scores, all_kinds, keys = [], [], []
    progress = _progress(getattr(batches, "num_samples", None), "images and their captions", "img")
    with torch.inference_mode(), precision_context(loaded):
        for batch in batches:
            metas = batch.meta if batch.meta is not None else [{}] * len(batch.keys)
            candidates = [_candidates(data, key, captions, meta)
                          for key, captions, meta in zip(batch.keys, batch.captions, metas)]
            kinds = [_negative_kinds(data, key, len(texts) - 1, meta)
                     for key, texts, meta in zip(batch.keys, candidates, metas)]
            images = batch.images.to(loaded.device, non_blocking=True)
            scores = [None] * len(batch.keys)
            # samples with the same number of captions are scored together: tokens [B, K, L]
            by_count = defaultdict(list)
            for position, texts in enumerate(candidates):
                by_count[len(texts)].append(position)
            for count, positions in by_count.items():
                texts = [caption for position in positions for caption in candidates[position]]
                tokens = loaded.tokenizer(texts).to(loaded.device)
                tokens = tokens.view(len(positions), count, -1)
                chosen = images if len(positions) == len(images) else \
                    images[torch.tensor(positions, device=images.device)]
                got = score_pairs(loaded, chosen, tokens)
                if tuple(got.shape) != (len(positions), count):
                    raise ValueError(f"a scorer returned scores of shape {tuple(got.shape)}, "
                                     f"expected {(len(positions), count)}")
                got = got.float().cpu().numpy()
                for row, position in enumerate(positions):
                    scores[position] = got[row]
            all_scores.extend(scores)
            all_kinds.extend(kinds)
            keys.extend(batch.keys)
            progress.update(len(batch.keys))
    progress.close()
    if not keys:
        raise UserError(f"{data}: no usable samples ({batches.corrupt_count} corrupt ones skipped)")
    result = {
        "dataset": data,
        "model": loaded.name,
        "pretrained": loaded.pretrained,
        "task": TASK,
        "metrics": selection_metrics(all_scores, all_kinds),
        "language": "en",
        "scorer": scorer,
        "num_samples": len(keys),
        "num_skipped": batches.corrupt_count,
    }
    return {"result": result, "scores": all_scores, "kinds": all_kinds, "keys": keys,
            "seconds": time.perf_counter() - start}


def selection_metrics(scores, kinds) -> dict:
    """`scores`: per image, the scores of its captions (true first); `kinds`: per image, the kind
    of each negative. acc: true caption strictly above every negative; acc_<kind>: fraction of
    (image, negative of that kind) pairs where the true caption is strictly above; chance: the
    expected acc of random scores (mean of 1 / number of captions)."""
    wins, total = defaultdict(int), defaultdict(int)
    correct, chance = 0, 0.0
    for image_scores, image_kinds in zip(scores, kinds):
        image_scores = np.asarray(image_scores, dtype=np.float64)
        beats = image_scores[0] > image_scores[1:]
        correct += bool(beats.all())
        chance += 1.0 / len(image_scores)
        for kind, won in zip(image_kinds, beats):
            wins[kind] += bool(won)
            total[kind] += 1
    count = len(scores)
    metrics = {"acc": correct / count}
    metrics.update({f"acc_{kind}": wins[kind] / total[kind] for kind in total})
    metrics.update({"chance": chance / count, "num_images": count})
    return metrics


def _candidates(data: str, key: str, captions: list, meta: dict) -> list:
    """[true caption, negatives...] of one sample (at most MAX_NEGATIVES negatives: the data is untrusted)."""
    negatives = meta.get("negatives")
    if not captions or not isinstance(negatives, list) or not negatives \
            or not all(isinstance(text, str) for text in negatives):
        raise UserError(f"{data}: sample {key} has no caption with a json 'negatives' list of strings; caption "
                        "selection needs both, as in the binding/ split of `mmssl prep synthetic`")
    if len(negatives) > MAX_NEGATIVES:
        raise UserError(f"{data}: sample {key} lists {len(negatives)} negatives; at most {MAX_NEGATIVES} are scored")
    return [captions[0], *negatives]


def _negative_kinds(data: str, key: str, count: int, meta: dict) -> list:
    """The kind of each of a sample's `count` negatives: its json `negative_kinds`, else negative_1, 2, ..."""
    kinds = meta.get("negative_kinds")
    if kinds is None:
        return [f"negative_{i}" for i in range(1, count + 1)]
    if not isinstance(kinds, list) or len(kinds) != count or not all(isinstance(k, str) for k in kinds):
        raise UserError(f"{data}: sample {key}: json 'negative_kinds' must be a list of {count} "
                        "strings, one per negative caption")
    return kinds
