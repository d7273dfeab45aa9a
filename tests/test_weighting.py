"""Learned uncertainty weights (issue 18, Kendall et al. 2018): the total and the gradient of the
log-variances equal the formula on tiny tensors, accumulation adds the penalty once, the
log-variances are logged per step, saved with the heads and not exported; fixed stays the default."""
import math

import pytest
import torch

from helpers import accumulation_matches, config, objective_for, token_batch
from mmssl.errors import UserError
from mmssl.objective import UncertaintyWeights
from mmssl.train.loop import train
from mmssl.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def test_uncertainty_total_and_its_gradient_follow_the_formula():
    weights = UncertaintyWeights(["contrastive_loss", "rotation_loss", "mlm_loss"])
    with torch.no_grad():
        weights.log_vars.copy_(torch.tensor([0.3, -0.7, 1.1]))
    losses = {"contrastive_loss": torch.tensor(2.0), "rotation_loss": torch.tensor(0.5)}   # mlm absent
    total = weights.total(losses)
    s = [0.3, -0.7]
    expected = sum(0.5 * math.exp(-si) * li + 0.5 * si for si, li in zip(s, (2.0, 0.5)))
    assert total.item() == pytest.approx(expected, rel=1e-6)
    total.backward()
    grad = weights.log_vars.grad.tolist()
    assert grad[0] == pytest.approx(0.5 * (1 - math.exp(-0.3) * 2.0), rel=1e-6)
    assert grad[1] == pytest.approx(0.5 * (1 - math.exp(0.7) * 0.5), rel=1e-6)
    assert grad[2] == 0.0                                   # an absent term's variance is untouched
    assert weights.total(losses, penalty=False).item() == pytest.approx(
        0.5 * math.exp(-0.3) * 2.0 + 0.5 * math.exp(0.7) * 0.5, rel=1e-6)


def test_objective_weighs_each_term_by_its_learned_variance(world):
    objective, _ = objective_for(world / "micro.json", "loss.rotation_weight=0.5", "loss.weighting=uncertainty")
    head = objective.heads["weighting"]
    assert head.names == ["contrastive_loss", "rotation_loss"]
    with torch.no_grad():
        head.log_vars.copy_(torch.tensor([0.2, -0.4]))
    images, texts = token_batch(rows=6)
    torch.manual_seed(3)
    terms = objective(images, texts, step=0)
    c, r = terms["contrastive_loss"].item(), terms["rotation_loss"].item()
    expected = 0.5 * math.exp(-0.2) * c + 0.1 + 0.5 * math.exp(0.4) * 0.5 * r - 0.2
    assert terms["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert terms["logvar_contrastive_loss"].item() == pytest.approx(0.2)
    assert terms["logvar_rotation_loss"].item() == pytest.approx(-0.4)


def test_uncertainty_weighting_accumulates_exactly_with_the_penalty_added_once(world):
    objective, _ = objective_for(world / "micro.json", "loss.rotation_weight=1", "loss.mlm_weight=0.5",
                                 "loss.weighting=uncertainty")
    with torch.no_grad():
        objective.heads["weighting"].log_vars.copy_(torch.tensor([0.1, -0.3, 0.4]))
    images, texts = token_batch(rows=12)
    grads = accumulation_matches(objective, images, texts, pieces=(3, 4))
    assert grads["heads.weighting.log_vars"].abs().min() > 0


def test_uncertainty_needs_two_terms_and_fixed_is_the_default(world):
    objective, cfg = objective_for(world / "micro.json", "loss.rotation_weight=1")
    assert cfg.loss.weighting == "fixed" and "weighting" not in objective.heads
    with pytest.raises(UserError, match="loss.weighting=uncertainty"):
        objective_for(world / "micro.json", "loss.kind=rotation", "loss.weighting=uncertainty")
    with pytest.raises(UserError, match="loss.weighting"):
        objective_for(world / "micro.json", "loss.weighting=learned")


def test_log_variances_are_logged_saved_and_not_exported(world, tmp_path):
    from mmssl.cli import main

    output = tmp_path / "run"
    result = train(config(world, output, "loss.kind=rotation", "loss.inpaint_weight=1",
                          "loss.weighting=uncertainty", "train.steps=3", "train.batch_size=8"))
    records = read_metrics(output / "metrics.jsonl")
    logged = [r["logvar_rotation_loss"] for r in records if "logvar_rotation_loss" in r]
    assert len(logged) == 3 and logged[0] == 0.0 and logged[-1] != 0.0      # learned from step 1 on
    state = torch.load(output / "checkpoints" / "latest.pt", weights_only=True)
    assert state["heads"]["weighting"]["log_vars"].shape == (2,)
    assert state["heads"]["weighting"]["log_vars"][0].item() == pytest.approx(
        [r for r in records if "logvar_rotation_loss" in r][-1]["logvar_rotation_loss"], abs=0.05)
    assert main(["export", "--checkpoint", str(output), "--out", str(tmp_path / "export")]) == 0
    exported = list((tmp_path / "export").glob("*.bin")) + list((tmp_path / "export").glob("*.safetensors"))
    assert exported and len(result.losses) == 3
