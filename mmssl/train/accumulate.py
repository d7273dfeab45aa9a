"""Gradient accumulation that keeps the contrastive batch exact (GradCache, Gao et al. 2021).

The contrastive loss needs every pair of the batch, but its gradient reaches the parameters only
through the features. So the features of all micro-batches are computed first without a graph, the
loss and its gradient with respect to those features are taken on the whole batch, and each
micro-batch is then re-run with a graph and back-propagated with its slice of that gradient (plus
its auxiliary terms, which the objective makes additive over micro-batches). The result is the
whole batch's gradient at the memory of one micro-batch.

The objective (`mmssl.objective.Objective`) supplies every piece: the step's random draws, the
encoders, the contrastive term, the auxiliary terms and the weighted total. The torch RNG is
replayed for the re-run, so dropout and patch dropout inside the towers draw what the first pass drew.
"""
from __future__ import annotations

import torch
from torch import nn


def accumulated_backward(objective: nn.Module, images: torch.Tensor, texts: torch.Tensor, micro_batches: int,
                         step: int | None = None) -> dict:
    """Back-propagate the whole batch's total loss in `micro_batches` pieces; the caller zeroes
    gradients before and steps the optimizer after.

    Returns detached terms: "contrastive_loss", each auxiliary term (its whole-batch value) and "loss".
    """
    draws = objective.draw(images, texts, step)
    bounds = _bounds(images.shape[0], micro_batches)
    rng_states, cached = [], []
    with torch.no_grad():
        for start, stop in bounds:
            rng_states.append(_rng_state(images.device))
            cached.append(objective.encode(images[start:stop], texts[start:stop], draws.rows(start, stop)))

    leaves = _feature_leaves(cached)
    contrastive = objective.contrastive_loss(_whole_batch(leaves), draws)
    contrastive.backward()

    aux_totals: dict = {}
    for index, (start, stop) in enumerate(bounds):
        _set_rng_state(rng_states[index], images.device)
        image_rows, text_rows, rows = images[start:stop], texts[start:stop], draws.rows(start, stop)
        outputs = objective.encode(image_rows, text_rows, rows)
        aux = objective.aux_terms(image_rows, text_rows, outputs, rows)
        surrogate = _surrogate(outputs, leaves, index, include_scalars=index == 0)
        if aux:
            surrogate = surrogate + objective.total(aux)
        surrogate.backward()
        for name, value in aux.items():
            aux_totals[name] = aux_totals.get(name, 0.0) + value.detach()

    terms = {"contrastive_loss": contrastive.detach(), **aux_totals}
    terms["loss"] = objective.total(terms)
    objective.end_step(draws)
    return terms


def _bounds(rows: int, pieces: int) -> list[tuple[int, int]]:
    """(start, stop) of `pieces` contiguous row ranges, the first `rows % pieces` one row longer."""
    base, extra = divmod(rows, pieces)
    bounds, start = [], 0
    for index in range(pieces):
        stop = start + base + (index < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def _feature_leaves(cached: list[dict]) -> dict:
    """Per-micro-batch features (fp32) and the shared scalars as graph leaves whose .grad the loss fills."""
    def leaf(tensor):  # detach: open_clip returns the logit_bias Parameter itself, not a copy
        return tensor.detach().float().requires_grad_(True)

    leaves = {
        "image_features": [leaf(out["image_features"]) for out in cached],
        "text_features": [leaf(out["text_features"]) for out in cached],
        "logit_scale": leaf(cached[0]["logit_scale"]),
    }
    if cached[0].get("logit_bias") is not None:
        leaves["logit_bias"] = leaf(cached[0]["logit_bias"])
    return leaves


def _whole_batch(leaves: dict) -> dict:
    outputs = {key: value for key, value in leaves.items() if not isinstance(value, list)}
    outputs.update(image_features=torch.cat(leaves["image_features"]), text_features=torch.cat(leaves["text_features"]))
    return outputs


def _surrogate(outputs: dict, leaves: dict, index: int, include_scalars: bool) -> torch.Tensor:
    """A scalar whose gradient w.r.t. the parameters is the loss gradient through this micro-batch.

    sum(features * dL/dfeatures) back-propagates dL/dfeatures; logit_scale (and logit_bias) are
    the same parameter in every micro-batch, so their cached gradient is injected once.
    """
    total = sum(
        (outputs[key] * leaves[key][index].grad.to(outputs[key].dtype)).sum()
        for key in ("image_features", "text_features")
    )
    if include_scalars:
        for key in ("logit_scale", "logit_bias"):
            if key in leaves:
                total = total + (outputs[key] * leaves[key].grad.to(outputs[key].dtype)).sum()
    return total


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
