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
                         step: int | None = None, views: torch.Tensor | None = None) -> dict:
    """Back-propagate the whole batch's total loss in `micro_batches` pieces; the caller zeroes
    gradients before and steps the optimizer after. `views` ([2, B, 3, H, W]) when the objective
    contrasts two views; `texts` may be None for image-only objectives.

    Returns detached terms: every whole-batch term ("contrastive_loss", batch terms such as
    "simclr_loss"), each auxiliary term (its whole-batch value) and "loss".
    """
    draws = objective.draw(images, texts, step)
    bounds = _bounds(images.shape[0], micro_batches)
    keys = objective.batch_feature_keys
    rng_states, cached = [], []
    with torch.no_grad():
        for start, stop in bounds:
            rng_states.append(_rng_state(images.device))
            cached.append(objective.encode(images[start:stop], _rows(texts, start, stop), draws.rows(start, stop),
                                           _rows(views, start, stop, dim=1)))

    leaves = _feature_leaves(cached, keys)
    whole = objective.batch_terms(_whole_batch(leaves, keys), draws)
    if whole:   # none when every term is additive (an image-only pretext task, loss.kind=mae)
        objective.total(whole).backward()

    aux_totals: dict = {}
    for index, (start, stop) in enumerate(bounds):
        _set_rng_state(rng_states[index], images.device)
        image_rows, text_rows, rows = images[start:stop], _rows(texts, start, stop), draws.rows(start, stop)
        outputs = objective.encode(image_rows, text_rows, rows, _rows(views, start, stop, dim=1))
        aux = objective.aux_terms(image_rows, text_rows, outputs, rows)
        surrogate = _surrogate(outputs, leaves, keys, index, include_scalars=index == 0)
        if aux:
            surrogate = surrogate + objective.total(aux, penalty=False)
            if index == 0 and objective.uncertainty is not None:   # the additive terms' 0.5 s_t, once a step
                surrogate = surrogate + objective.uncertainty.penalty(aux)
        surrogate.backward()
        for name, value in aux.items():
            aux_totals[name] = aux_totals.get(name, 0.0) + value.detach()

    terms = {**{name: value.detach() for name, value in whole.items()}, **aux_totals}
    terms["loss"] = objective.total(terms)
    terms.update(objective.logged_weights())
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


def _rows(tensor, start: int, stop: int, dim: int = 0):
    """Rows start:stop along `dim` (None stays None: no captions, or no views)."""
    return None if tensor is None else tensor.narrow(dim, start, stop - start)


def _feature_leaves(cached: list[dict], keys: tuple) -> dict:
    """Per-micro-batch features `keys` (fp32) and the shared scalars as graph leaves whose .grad the loss fills."""
    def leaf(tensor):  # detach: open_clip returns the logit_bias Parameter itself, not a copy
        return tensor.detach().float().requires_grad_(True)

    leaves = {key: [leaf(out[key]) for out in cached] for key in keys}
    for key in ("logit_scale", "logit_bias"):
        if cached[0].get(key) is not None:
            leaves[key] = leaf(cached[0][key])
    return leaves


def _whole_batch(leaves: dict, keys: tuple) -> dict:
    outputs = {key: value for key, value in leaves.items() if not isinstance(value, list)}
    outputs.update({key: torch.cat(leaves[key]) for key in keys})
    return outputs


def _surrogate(outputs: dict, leaves: dict, keys: tuple, index: int, include_scalars: bool) -> torch.Tensor:
    """A scalar whose gradient w.r.t. the parameters is the loss gradient through this micro-batch.

    sum(features * dL/dfeatures) back-propagates dL/dfeatures; logit_scale (and logit_bias) are
    the same parameter in every micro-batch, so their cached gradient is injected once.
    """
    total = sum(
        (outputs[key] * leaves[key][index].grad.to(outputs[key].dtype)).sum()
        for key in keys if leaves[key][index].grad is not None
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
