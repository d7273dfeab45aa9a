"""One precision/device policy: `auto` follows the hardware, fp16 needs CUDA, train/eval/validation agree."""
import pytest
import torch

import mmssl.train.policy as policy
from mmssl.config import load_config
from mmssl.errors import UserError

CPU = torch.device("cpu")


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Pretend this CPU does (True) or does not (False) multiply bf16 natively."""
    def pretend(native: bool):
        monkeypatch.setattr(policy, "_cpu_has_native_bf16", lambda: native)
    return pretend


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_is_bf16_only_where_native(cpu_bf16, native, expected):
    cpu_bf16(native)
    assert policy.resolve_precision("auto", CPU) == expected
    assert policy.resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert policy.native_bf16(CPU) is native


def test_explicit_choices_and_their_dtypes(cpu_bf16):
    cpu_bf16(False)
    assert policy.resolve_precision("bf16", CPU) == "bf16"  # asked for: runs, with a note
    assert "emulated" in policy.emulation_note("bf16", CPU)
    assert policy.emulation_note("fp32", CPU) is None
    cpu_bf16(True)
    assert policy.emulation_note("bf16", CPU) is None
    assert [policy.autocast_dtype(p) for p in ("fp32", "bf16", "fp16")] == [None, torch.bfloat16, torch.float16]
    assert not policy.grad_scaler("bf16", CPU).is_enabled()  # loss scaling is for fp16 (CUDA) only
    assert not policy.grad_scaler("fp32", CPU).is_enabled()


def test_refusals_name_the_key():
    with pytest.raises(UserError, match=r"^train.precision=fp16 needs a CUDA device"):
        policy.resolve_precision("fp16", CPU)
    with pytest.raises(UserError, match=r"^bad value for --precision: 'fp8'"):
        policy.resolve_precision("fp8", CPU, "--precision")
    with pytest.raises(UserError, match=r"^bad value for train.precision: 'half' \(must be one of auto, fp32, bf16, fp16\)"):
        load_config(None, ["train.precision=half"])
    with pytest.raises(UserError, match="fp16's loss scaling cannot be combined with train.accum_steps > 1"):
        load_config(None, ["train.precision=fp16", "train.accum_steps=2"])


def test_eval_and_validation_use_the_same_policy(cpu_bf16):
    from eval.embed import autocast_dtype
    from mmssl.train.validation import ZeroShotValidation

    cpu_bf16(False)
    assert autocast_dtype("auto", CPU) is None
    assert autocast_dtype("bf16", CPU) is torch.bfloat16
    cpu_bf16(True)
    assert autocast_dtype("auto", CPU) is torch.bfloat16
    # validation runs in the training run's resolved precision (fp16 is no longer dropped to fp32)
    assert ZeroShotValidation("unused", CPU, "fp16").autocast_dtype is torch.float16
    assert ZeroShotValidation("unused", CPU, "fp32").autocast_dtype is None


def test_the_objective_runs_towers_in_bf16_and_the_loss_in_fp32(micro_json):
    import mmssl
    from mmssl.objective import Objective

    cfg = load_config(None, [f"model.name={micro_json}", "loss.mlm_weight=1"])
    objective = Objective(mmssl.create_model(cfg.model), cfg, precision="bf16")
    images, texts = torch.randn(4, 3, 32, 32), torch.randint(1, 49000, (4, 16))
    draws = objective.draw(images, texts)
    outputs = objective.encode(images, texts, draws)
    assert outputs["image_features"].dtype == torch.bfloat16
    terms = objective(images, texts)
    assert {name: value.dtype for name, value in terms.items()} == dict.fromkeys(terms, torch.float32)


@pytest.mark.parametrize("native, dtype", [(True, torch.bfloat16), (False, torch.float32)])
def test_muon_orthogonalises_in_the_fast_matmul_dtype(cpu_bf16, native, dtype):
    from mmssl.train.muon import orthogonalize
    from mmssl.train.optim import build_muon

    cpu_bf16(native)
    model = torch.nn.Module()
    model.resblocks = torch.nn.ModuleList([torch.nn.Linear(8, 8)])
    cfg = load_config(None, ["train.optimizer=muon"]).train
    assert build_muon(model, cfg).newton_schulz_dtype is dtype
    singular = torch.linalg.svdvals(orthogonalize(torch.randn(32, 96), dtype=dtype))
    assert 0.4 < singular.min() and singular.max() < 1.3
