"""Exact-batch gradient accumulation through the objective's pieces, and the one place a term is added.

In fp32, one step with accum_steps=1 and with accum_steps=4 must give the same gradients for the
contrastive loss plus every head: the objective draws the step's masks once for the whole batch and
every auxiliary term is additive over micro-batches.
"""
import dataclasses

import pytest
import torch
from torch import nn

import mmssl
from helpers import CPU
import mmssl.objective as objective_module
from mmssl.config import LossConfig, load_config, to_dict
from mmssl.objective import Objective, Term
from mmssl.train.accumulate import accumulated_backward
from mmssl.train.loop import Trainer

HEADS = ["heads.inpaint.decoder_width=32", "heads.inpaint.decoder_depth=1", "heads.inpaint.decoder_heads=2",
         "heads.mlm.mask_prob=0.3"]
SETTINGS = {
    "clip": [],
    "siglip": ["loss.kind=siglip"],
    "clip+mlm+inpaint": ["loss.mlm_weight=0.5", "loss.inpaint_weight=2"],
    "siglip+mlm+inpaint(shared)": ["loss.kind=siglip", "loss.mlm_weight=0.5", "loss.inpaint_weight=2",
                                   "heads.inpaint.mode=shared"],
}

pytestmark = pytest.mark.usefixtures("one_thread")




def build(micro_json, *overrides, **model_overrides):
    cfg = load_config(None, [f"model.name={micro_json}", *HEADS, *overrides])
    torch.manual_seed(0)
    model = mmssl.create_model(cfg.model, siglip=cfg.loss.kind == "siglip", **model_overrides).train()
    return Objective(model, cfg), cfg


def batch(rows=32):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(rows, 3, 32, 32, generator=generator)
    texts = torch.randint(1, 49000, (rows, 16), generator=generator)
    texts[:, 12:] = 0                      # padding after an end-of-text token at column 11
    texts[:, 11] = 49407
    return images, texts


def grads(module):
    return {name: p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None}


def assert_same_grads(accumulated, full):
    assert accumulated.keys() == full.keys() and len(full) > 30
    for name, grad in full.items():
        # fp32 summation order differs: allow rounding at 1e-5 of the tensor's largest entry
        scale = grad.abs().max().item()
        torch.testing.assert_close(accumulated[name], grad, rtol=1e-4, atol=max(1e-5 * scale, 1e-8), msg=name)


def one_step(objective, images, texts, micro_batches, seed=7):
    """(terms, gradients) of one step at step 0, all masks drawn from `seed`."""
    objective.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    if micro_batches == 1:
        terms = objective(images, texts, step=0)
        terms["loss"].backward()
    else:
        terms = accumulated_backward(objective, images, texts, micro_batches, step=0)
    return {name: value.detach() for name, value in terms.items()}, grads(objective)


@pytest.mark.parametrize("setting", SETTINGS)
def test_accumulation_gives_the_whole_batch_gradients(setting, micro_json):
    objective, _ = build(micro_json, *SETTINGS[setting])
    images, texts = batch()
    full_terms, full = one_step(objective, images, texts, micro_batches=1)
    split_terms, split = one_step(objective, images, texts, micro_batches=4)
    assert split_terms.keys() == full_terms.keys()
    for name, value in full_terms.items():
        torch.testing.assert_close(split_terms[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert_same_grads(split, full)
    heads = [name for name in full if name.startswith("heads.")]
    assert bool(heads) == ("mlm" in setting)   # the heads' own parameters are compared too
    assert objective.model.logit_scale.grad.abs().item() > 0


def test_uneven_micro_batches_and_every_split(micro_json):
    objective, _ = build(micro_json, *SETTINGS["clip+mlm+inpaint"])
    images, texts = batch(rows=30)
    full_terms, full = one_step(objective, images, texts, micro_batches=1)
    for pieces in (2, 7, 30):  # 30 = one row per micro-batch: rows with no MLM pick contribute 0
        terms, split = one_step(objective, images, texts, micro_batches=pieces)
        torch.testing.assert_close(terms["loss"], full_terms["loss"], rtol=1e-5, atol=1e-6)
        assert_same_grads(split, full)


def test_tower_randomness_is_replayed_in_the_recompute(micro_json):
    """FLIP patch dropout is drawn inside open_clip's tower, per micro-batch, so the reference is the
    same micro-batch forwards in one graph; the re-run must draw what the first pass drew."""
    objective, _ = build(micro_json, patch_dropout=0.5)
    images, texts = batch(rows=16)
    torch.manual_seed(3)
    draws = objective.draw(images, texts, step=0)
    outs = [objective.encode(images[a:b], texts[a:b], draws.rows(a, b)) for a, b in ((0, 8), (8, 16))]
    whole = {"image_features": torch.cat([o["image_features"] for o in outs]),
             "text_features": torch.cat([o["text_features"] for o in outs]), "logit_scale": outs[0]["logit_scale"]}
    objective.contrastive_loss(whole).backward()
    reference = grads(objective)
    _, accumulated = one_step(objective, images, texts, micro_batches=2, seed=3)
    assert_same_grads(accumulated, reference)


@dataclasses.dataclass
class LossWithDummy(LossConfig):
    dummy_weight: float = 0.0


def _dummy_head(model, cfg, heads):
    return nn.Linear(32, 1)


def _dummy_term(objective, images, texts, outputs, draws):
    """Additive over micro-batches: a per-row sum divided by the whole batch's rows."""
    return objective.heads["dummy"](outputs["image_features"].float()).pow(2).sum() / draws.batch_size


def test_a_new_term_is_one_entry_in_the_objective_and_one_config_field(micro_json, tmp_path, monkeypatch):
    """The whole diff of adding a term: `Term(...)` in mmssl.objective.TERMS and `dummy_weight` in
    LossConfig. Total, the trainer's logged values, checkpoints and accumulation pick it up."""
    monkeypatch.setattr(objective_module, "TERMS",
                        objective_module.TERMS + (Term("dummy_loss", "dummy_weight", "dummy", _dummy_head, _dummy_term),))
    cfg = load_config(None, [f"model.name={micro_json}", *HEADS, "loss.mlm_weight=0.5", f"train.output={tmp_path}/run",
                             "train.accum_steps=4", "train.lr=1e-3"])
    cfg.loss = LossWithDummy(**dataclasses.asdict(cfg.loss), dummy_weight=3.0)
    torch.manual_seed(0)
    objective = Objective(mmssl.create_model(cfg.model).train(), cfg)
    assert set(objective.heads) == {"mlm", "dummy"}
    images, texts = batch()

    full_terms, full = one_step(objective, images, texts, micro_batches=1)
    assert set(full_terms) == {"contrastive_loss", "mlm_loss", "dummy_loss", "loss"}
    expected = full_terms["contrastive_loss"] + 0.5 * full_terms["mlm_loss"] + 3.0 * full_terms["dummy_loss"]
    torch.testing.assert_close(full_terms["loss"], expected)
    split_terms, split = one_step(objective, images, texts, micro_batches=4)
    torch.testing.assert_close(split_terms["dummy_loss"], full_terms["dummy_loss"], rtol=1e-5, atol=1e-7)
    assert_same_grads(split, full)
    assert full["heads.dummy.weight"].abs().sum() > 0

    trainer = Trainer(cfg.train, CPU, objective, loader=None, config_record=to_dict(cfg))
    values = trainer.train_step(images, texts)
    assert set(values) == {"contrastive_loss", "mlm_loss", "dummy_loss", "loss"}
    assert objective.heads_state_dict()["dummy"]["weight"].shape == (1, 32)


def test_an_unknown_term_has_no_weight(micro_json):
    objective, _ = build(micro_json)
    with pytest.raises(KeyError, match="no weight for loss term 'stray_loss'"):
        objective.total({"contrastive_loss": torch.tensor(1.0), "stray_loss": torch.tensor(2.0)})
