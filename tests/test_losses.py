"""ClipLoss / SigLipLoss match open_clip's values and gradients (accumulation: tests/test_accumulate.py)."""
import math

import open_clip.loss as oc_loss
import pytest
import torch

import mmssl
from mmssl.losses import (
    INIT_LOGIT_SCALE,
    ClipLoss,
    SigLipLoss,
    clamp_logit_scale,
)


def _features(batch, dim, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(batch, dim, generator=generator, dtype=dtype), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(batch, dim, generator=generator, dtype=dtype), dim=-1)
    return image.requires_grad_(True), text.requires_grad_(True)


def _value_and_grads(loss_module, image, text, *scalars):
    scalars = [s.clone().requires_grad_(True) for s in scalars]
    image, text = image.detach().clone().requires_grad_(True), text.detach().clone().requires_grad_(True)
    value = loss_module(image, text, *scalars)
    value.backward()
    return value.detach(), [image.grad, text.grad] + [s.grad for s in scalars]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_clip_loss_matches_open_clip(batch, dtype):
    image, text = _features(batch, 32, dtype, seed=batch)
    scale = torch.tensor(math.exp(INIT_LOGIT_SCALE), dtype=dtype)
    ours, our_grads = _value_and_grads(ClipLoss(cache_labels=True), image, text, scale)
    theirs, their_grads = _value_and_grads(oc_loss.ClipLoss(cache_labels=True), image, text, scale)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
    for mine, ref in zip(our_grads, their_grads):
        torch.testing.assert_close(mine, ref, rtol=tol, atol=tol)
    if batch == 1:
        assert ours.item() == 0.0  # one pair: softmax over a single column is certain


def test_clip_loss_hand_computed_two_pairs():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = torch.tensor(10.0)
    # logits = 10 * [[1, 0.6], [0, 0.8]]; rows (images) and columns (texts) each pick their diagonal
    row = (-math.log(math.exp(10) / (math.exp(10) + math.exp(6))) - math.log(math.exp(8) / (1 + math.exp(8)))) / 2
    col = (-math.log(math.exp(10) / (math.exp(10) + 1)) - math.log(math.exp(8) / (math.exp(6) + math.exp(8)))) / 2
    assert ClipLoss()(image, text, scale).item() == pytest.approx((row + col) / 2, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 5, 48])
def test_siglip_loss_matches_open_clip(batch, dtype):
    image, text = _features(batch, 16, dtype, seed=100 + batch)
    scale, bias = torch.tensor(10.0, dtype=dtype), torch.tensor(-10.0, dtype=dtype)
    ours, our_grads = _value_and_grads(SigLipLoss(), image, text, scale, bias)
    theirs, their_grads = _value_and_grads(oc_loss.SigLipLoss(), image, text, scale, bias)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
    for mine, ref in zip(our_grads, their_grads):
        torch.testing.assert_close(mine, ref, rtol=tol, atol=tol)


def test_logit_scale_init_and_clamp():
    model = mmssl.create_model("tiny-vit-64")
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    clamp_logit_scale(model)
    assert model.logit_scale.exp().item() == pytest.approx(100.0)
