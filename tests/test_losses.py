"""ClipLoss / SigLipLoss match open_clip's values and gradients; the accumulation step is exact."""
import json
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
    contrastive_step_with_accumulation,
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


def _param_grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(accumulated, full):
    assert accumulated.keys() == full.keys() and len(full) > 30
    for name, grad in full.items():
        torch.testing.assert_close(accumulated[name], grad, rtol=1e-5, atol=1e-5, msg=name)


MICRO_CONFIG = {  # tiny-vit-64's shape at a fraction of its cost: the test is about the bookkeeping
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 2, "layers": 2},
}


@pytest.mark.parametrize("kind", ["clip", "siglip", "clip+aux"])
def test_accumulation_gives_full_batch_gradients(kind, tmp_path):
    """micro 4 x 8 reproduces the parameter gradients of one exact batch of 32 (fp32, no dropout)."""
    (tmp_path / "micro.json").write_text(json.dumps(MICRO_CONFIG))
    torch.manual_seed(0)
    model = mmssl.create_model(str(tmp_path / "micro.json"), siglip=kind == "siglip").train()
    images = torch.randn(32, 3, 32, 32)
    texts = torch.randint(1, 1000, (32, 16))
    loss_fn = SigLipLoss() if kind == "siglip" else ClipLoss()
    scalars = ("logit_scale", "logit_bias") if kind == "siglip" else ("logit_scale",)
    aux = (lambda im, tx, out: {"cube_loss": out["image_features"].pow(3).sum(-1).mean()}) if kind == "clip+aux" else None

    model.zero_grad()
    out = model(images, texts)
    full_loss = loss_fn(out["image_features"], out["text_features"], *(out[key] for key in scalars))
    full_aux = aux(images, texts, out)["cube_loss"] if aux else 0
    full_total = full_loss + 0.5 * full_aux
    full_total.backward()
    full = _param_grads(model)

    model.zero_grad()
    result = contrastive_step_with_accumulation(model, images, texts, loss_fn, micro_batches=4, aux_loss_fn=aux,
                                                aux_weights={"cube_loss": 0.5})
    torch.testing.assert_close(result["contrastive_loss"], full_loss.detach(), rtol=1e-5, atol=1e-6)
    if aux:  # the term is reported under its own name, as its full-batch mean
        torch.testing.assert_close(result["cube_loss"], full_aux.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result["loss"], full_total.detach(), rtol=1e-5, atol=1e-6)
    _assert_same_grads(_param_grads(model), full)
    assert model.logit_scale.grad.abs().item() > 0


def test_accumulation_replays_patch_dropout_masks(tmp_path):
    """With FLIP patch dropout the re-run must draw the masks of the first pass (RNG replay).

    Reference: the same micro-batch forwards from the same seed, kept in one graph.
    """
    (tmp_path / "micro.json").write_text(json.dumps(MICRO_CONFIG))
    model = mmssl.create_model(str(tmp_path / "micro.json"), patch_dropout=0.5).train()
    images, texts = torch.randn(16, 3, 32, 32), torch.randint(1, 1000, (16, 16))
    torch.manual_seed(1)
    outs = [model(i, t) for i, t in zip(images.chunk(2), texts.chunk(2))]
    ClipLoss()(torch.cat([o["image_features"] for o in outs]), torch.cat([o["text_features"] for o in outs]),
               outs[0]["logit_scale"]).backward()
    reference = _param_grads(model)
    model.zero_grad()
    torch.manual_seed(1)
    contrastive_step_with_accumulation(model, images, texts, ClipLoss(), micro_batches=2)
    _assert_same_grads(_param_grads(model), reference)
