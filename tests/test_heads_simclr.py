"""SimCLR in the objective: SLIP (`loss.simclr_weight`) and image-only (`loss.kind=simclr`) -- the
head's sizes, weight 0 builds nothing, the term's value, exact gradient accumulation."""
import pytest
import torch

import mmssl
from helpers import accumulation_matches
from mmssl.config import SimCLRHeadConfig, load_config
from mmssl.errors import UserError
from mmssl.heads.simclr import SimCLRHead, slip_sizes
from mmssl.heads.vit_tokens import pooled_output
from mmssl.losses import SimCLRLoss
from mmssl.objective import Objective
from mmssl.train.optim import build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")


def build(micro_json, *overrides):
    cfg = load_config(None, [f"model.name={micro_json}", *overrides])
    torch.manual_seed(0)
    return Objective(mmssl.create_model(cfg.model).train(), cfg), cfg


def batch(rows=24):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(rows, 3, 32, 32, generator=generator)
    texts = torch.randint(1, 49000, (rows, 16), generator=generator)
    texts[:, 11], texts[:, 12:] = 49407, 0
    views = torch.randn(2, rows, 3, 32, 32, generator=generator)
    return images, texts, views


def test_head_keeps_slips_ratios_to_the_tower_width(micro_json):
    assert slip_sizes(768, SimCLRHeadConfig()) == (4096, 256)     # SLIP's ViT-B head
    assert slip_sizes(192, SimCLRHeadConfig()) == (1024, 64)      # tiny-vit-64
    assert slip_sizes(64, SimCLRHeadConfig(hidden_dim=100, out_dim=16)) == (100, 16)
    model = mmssl.create_model(str(micro_json))                    # width 64, embed 32
    head = SimCLRHead(model, SimCLRHeadConfig())
    assert [layer.out_features for layer in head.mlp if isinstance(layer, torch.nn.Linear)] == [344, 344, 24]
    images = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(pooled_output(model.visual, images) @ model.visual.proj, model.visual(images))
    assert head(model, images).shape == (3, 24)
    projected = SimCLRHead(model, SimCLRHeadConfig(input="projected"))   # 32 = the model's embed dim
    assert projected.mlp[0].in_features == 32 and projected(model, images).shape == (3, 16)


def test_head_input_auto_is_pooled_for_slip_and_projected_image_only(micro_json):
    assert not build(micro_json, "loss.simclr_weight=1")[0].heads["simclr"].projected
    assert build(micro_json, "loss.kind=simclr")[0].heads["simclr"].projected
    assert not build(micro_json, "loss.kind=simclr", "heads.simclr.input=pooled")[0].heads["simclr"].projected


def test_weight_zero_builds_no_head_no_parameters_no_views(micro_json):
    off, cfg = build(micro_json)
    assert "simclr" not in off.heads and not off.needs_views and not off.image_only
    assert set(map(id, off.parameters())) == set(map(id, off.model.parameters()))
    images, texts, _ = batch(8)
    assert set(off(images, texts, step=0)) == {"contrastive_loss", "loss"}
    on, _ = build(micro_json, "loss.simclr_weight=1")
    assert on.needs_views and sum(p.numel() for p in on.heads["simclr"].parameters()) > 0


def test_slip_adds_the_weighted_nt_xent_of_the_two_views(micro_json):
    objective, _ = build(micro_json, "loss.simclr_weight=0.5", "loss.simclr_temperature=0.2")
    images, texts, views = batch(8)
    terms = objective(images, texts, step=0, views=views)
    assert set(terms) == {"contrastive_loss", "simclr_loss", "loss"}
    head = objective.heads["simclr"]
    expected = SimCLRLoss(0.2)(head(objective.model, views[0]), head(objective.model, views[1]))
    assert terms["simclr_loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["loss"].item() == pytest.approx((terms["contrastive_loss"] + 0.5 * expected).item(), rel=1e-6)


@pytest.mark.parametrize("setting", [["loss.simclr_weight=0.7"], ["loss.kind=simclr"]])
def test_accumulation_is_exact_with_simclr(micro_json, setting):
    objective, _ = build(micro_json, *setting)
    images, texts, views = batch(24)
    texts = None if objective.image_only else texts
    full = accumulation_matches(objective, images, texts, pieces=(3, 5), views=views)
    assert any(name.startswith("heads.simclr.") for name in full)


def test_image_only_trains_the_image_tower_and_head_alone(micro_json):
    objective, cfg = build(micro_json, "loss.kind=simclr")
    assert objective.image_only and objective.needs_views and objective.weights == {"simclr_loss": 1.0}
    images, _, views = batch(8)
    terms = objective(images, None, step=0, views=views)
    assert set(terms) == {"simclr_loss", "loss"} and terms["loss"].item() == terms["simclr_loss"].item() > 0
    terms["loss"].backward()
    trained = {name for name, p in objective.named_parameters() if p.grad is not None}
    assert trained and all(name.startswith(("model.visual.", "heads.simclr.")) for name in trained)
    in_optimizer = {id(p) for group in build_optimizer(objective, cfg.train).param_groups for p in group["params"]}
    assert id(objective.model.token_embedding.weight) not in in_optimizer
    assert id(objective.model.logit_scale) not in in_optimizer


@pytest.mark.parametrize("overrides,message", [
    (["loss.kind=simclr", "loss.simclr_weight=1"], "leave loss.simclr_weight at 0"),
    (["loss.kind=simclr", "loss.mlm_weight=1"], "loss.mlm_weight needs captions"),
])
def test_image_only_refuses_what_needs_captions(micro_json, overrides, message):
    with pytest.raises(UserError, match=message):
        build(micro_json, *overrides)


def test_image_only_refuses_zero_shot_validation(micro_json):
    with pytest.raises(UserError, match="needs a text tower; loss.kind=simclr trains the image tower alone"):
        load_config(None, ["loss.kind=simclr", "train.val_every=10", "data.val=somewhere"])
