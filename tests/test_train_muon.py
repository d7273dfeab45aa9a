"""`train.optimizer=muon`: Muon on the transformer block matrices, AdamW (exactly torch's) on the rest."""
import pytest
import torch

from helpers import CPU, config
from mmssl.cli import main
from mmssl.config import load_config
from mmssl.models import create_model
from mmssl.train.loop import build_trainer, train
from mmssl.train.muon import NEWTON_SCHULZ_COEFFS, MuonAdamW, is_block_matrix, orthogonalize, orthogonalize_all
from mmssl.train.optim import build_optimizer, build_scheduler


def test_orthogonalize_flattens_the_spectrum():
    torch.manual_seed(0)
    matrix = torch.randn(96, 32) @ torch.diag(torch.logspace(-1, 1, 32))  # condition number 100
    singular = torch.linalg.svdvals(orthogonalize(matrix))
    assert singular.min() > 0.5 and singular.max() < 1.3
    assert orthogonalize(matrix.T).shape == (32, 96)


def one_matrix_newton_schulz(matrix, steps=5, dtype=torch.float32):
    """The quintic iteration on one matrix with plain 2-d matmuls: the reference for the batches."""
    a, b, c = NEWTON_SCHULZ_COEFFS
    x = matrix.to(dtype)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(matrix.dtype)


# bf16: within a few bf16 ulps (8-bit mantissa); a CPU without native bf16 rounds bmm and mm apart
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_same_shape_matrices_are_orthogonalized_together_as_one_at_a_time(dtype, tolerance):
    torch.manual_seed(0)
    # the tiny ViT's block shapes (in_proj, out_proj, c_fc, c_proj), two of each, tall and wide
    shapes = [(576, 192), (192, 192), (768, 192), (192, 768)] * 2 + [(40, 24)]
    matrices = [torch.randn(*shape) for shape in shapes]
    batched = orthogonalize_all(matrices, dtype=dtype)
    for matrix, result in zip(matrices, batched):
        reference = one_matrix_newton_schulz(matrix, dtype=dtype)
        assert result.shape == matrix.shape and result.dtype == matrix.dtype
        assert (result - reference).abs().max() < tolerance * reference.abs().max()


def test_a_muon_step_over_many_matrices_is_each_matrix_stepped_alone():
    torch.manual_seed(1)
    shapes = [(48, 16), (16, 48), (48, 16), (16, 16)]
    together = [torch.nn.Parameter(torch.randn(*shape)) for shape in shapes]
    alone = [torch.nn.Parameter(p.detach().clone()) for p in together]
    optimizer = MuonAdamW([{"params": together, "muon": True}], lr=0.02, newton_schulz_dtype=torch.float32)
    singles = [MuonAdamW([{"params": [p], "muon": True}], lr=0.02, newton_schulz_dtype=torch.float32)
               for p in alone]
    for _ in range(3):
        grads = [torch.randn(*shape) for shape in shapes]
        for p, q, g in zip(together, alone, grads):
            p.grad, q.grad = g.clone(), g.clone()
        optimizer.step()
        for single in singles:
            single.step()
    for p, q in zip(together, alone):
        assert torch.allclose(p, q, atol=1e-6)


def test_resnet_stage_filters_take_muon_steps_as_flattened_matrices():
    model = create_model("tiny-rn-64")
    names = {n for n, p in model.named_parameters() if is_block_matrix(n, p)}
    assert "visual.layer1.0.conv2.weight" in names and "visual.layer4.0.downsample.0.weight" in names
    assert not any(n.startswith(("visual.conv", "visual.attnpool", "visual.bn")) for n in names)
    assert "transformer.resblocks.0.attn.in_proj_weight" in names
    torch.manual_seed(2)
    filters = torch.nn.Parameter(torch.randn(24, 12, 3, 3))
    flat = torch.nn.Parameter(filters.detach().flatten(1).clone())
    initial = flat.detach().clone()
    steps = [MuonAdamW([{"params": [p], "muon": True}], lr=0.02, newton_schulz_dtype=torch.float32)
             for p in (filters, flat)]
    for _ in range(3):
        grad = torch.randn(24, 12, 3, 3)
        filters.grad, flat.grad = grad.clone(), grad.flatten(1).clone()
        for optimizer in steps:
            optimizer.step()
    assert filters.shape == (24, 12, 3, 3)
    assert torch.equal(filters.detach().flatten(1), flat.detach())
    assert (flat.detach() - initial).abs().max() > 0.01


def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(0)
    ours_params = [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))]
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in ours_params]
    def groups(ps):
        return [{"params": [ps[0]], "weight_decay": 0.1}, {"params": [ps[1]], "weight_decay": 0.0}]
    ours = MuonAdamW(groups(ours_params), lr=1e-2, betas=(0.9, 0.98), eps=1e-6)
    ref = torch.optim.AdamW(groups(ref_params), lr=1e-2, betas=(0.9, 0.98), eps=1e-6)
    for step in range(5):
        grads = [torch.randn_like(p) for p in ours_params]
        for p, q, g in zip(ours_params, ref_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for p, q in zip(ours_params, ref_params):
        assert torch.allclose(p, q, atol=1e-6)


def test_muon_takes_the_block_matrices_and_follows_the_schedule():
    cfg = load_config("tiny", ["train.optimizer=muon", "train.muon_lr=0.02", "train.warmup=10"])
    model = create_model(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    muon = [g for g in optimizer.param_groups if g["muon"]]
    assert len(muon) == 1
    names = {id(p): n for n, p in model.named_parameters()}
    block_names = {names[id(p)] for p in muon[0]["params"]}
    assert block_names == {n for n, p in model.named_parameters() if is_block_matrix(n, p)}
    assert any("visual.transformer.resblocks.0.attn.in_proj_weight" == n for n in block_names)
    assert any(n.startswith("transformer.resblocks.3.mlp.c_proj") for n in block_names)
    assert not any("embedding" in n or "conv1" in n or "proj" == n.split(".")[-1] for n in block_names)
    scheduler = build_scheduler(optimizer, cfg.train)
    assert muon[0]["lr"] == pytest.approx(0.02 / 10)  # warmup step 1 of 10
    optimizer.step()  # no gradients yet: a no-op, keeps torch's step-order check quiet
    scheduler.step()
    assert muon[0]["lr"] == pytest.approx(0.02 * 2 / 10)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.train.lr * 2 / 10)


def test_muon_run_learns_and_resumes_exactly(world, tmp_path):
    args = ("train.steps=8", "train.optimizer=muon", "train.save_every=4")
    straight = train(config(world, tmp_path / "a", *args))
    assert straight.losses[-1] < straight.losses[0]
    (tmp_path / "b").mkdir()
    first = build_trainer(config(world, tmp_path / "b", *args), CPU)
    first.cfg.steps = 4
    first.fit()
    resumed = train(config(world, tmp_path / "b", *args, "train.resume=latest"))
    assert resumed.losses == straight.losses[4:]


def test_unknown_optimizer_is_one_line_and_exit_2(world, tmp_path, capfd):
    code = main(["train", "--config", "tiny", f"data.train={world / 'syn' / 'train'}", "train.optimizer=sgd",
                 f"train.output={tmp_path}"])
    err = capfd.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "train.optimizer" in err
