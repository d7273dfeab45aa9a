"""`train.fsdp=true` (mmssl.train.fsdp) under `torchrun --nproc_per_node 2` on CPU (gloo): the same
losses and weights as the unsharded run, exact resume, checkpoints that load in one process."""
import subprocess

import pytest
import torch

import mmssl
from helpers import needs_torchrun, torchrun_mmssl_train, write_micro_model
from mmssl.cli import main
from mmssl.train.metrics import read_metrics

# four steps of 8 samples per rank, a checkpoint after step 2 and after step 4; grad_clip=1 clips here
RUN = ["train.batch_size=8", "train.steps=4", "train.warmup=2", "train.save_every=2", "train.log_every=1",
       "train.precision=fp32", "data.workers=0", "data.shuffle_buffer=32", "data.val=null"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp")
    assert main(["prep", "synthetic", "--out", str(folder / "syn"), "--num-train", "160", "--num-val", "48",
                 "--quiet"]) == 0
    write_micro_model(folder)
    return folder


def torchrun(world, output: str, *extra) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m mmssl train` of the micro model, one thread per process."""
    overrides = [f"model.name={world / 'micro.json'}", f"data.train={world / 'syn/train'}",
                 f"train.output={world / output}", *RUN, *extra]
    return torchrun_mmssl_train(overrides)


def train_ok(world, output: str, *extra) -> dict:
    done = torchrun(world, output, *extra)
    assert done.returncode == 0, [line for line in done.stderr.splitlines()
                                  if "Error" in line or "mmssl" in line or line.startswith("[rank")][-20:]
    return torch.load(world / output / "checkpoints/latest.pt", weights_only=True)


def losses(world, output: str) -> list:
    return [record["loss"] for record in read_metrics(world / output / "metrics.jsonl")]


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    assert all(a[key].shape == b[key].shape for key in a)
    return max((a[key].double() - b[key].double()).abs().max().item() for key in a)


@pytest.fixture(scope="module")
def adamw_runs(world):
    """The unsharded and the FSDP run of AdamW with train.accum_steps=2 (GradCache's several passes)."""
    extra = ["train.optimizer=adamw", "train.accum_steps=2"]
    return train_ok(world, "plain", *extra), train_ok(world, "sharded", *extra, "train.fsdp=true"), extra


@needs_torchrun
def test_fsdp_equals_unsharded_run(world, adamw_runs):
    plain, sharded, _ = adamw_runs
    assert sharded["fsdp"] is True and "fsdp" not in plain
    assert losses(world, "sharded") == pytest.approx(losses(world, "plain"), abs=1e-5)
    assert len(losses(world, "sharded")) == 4 and losses(world, "sharded")[0] != losses(world, "sharded")[3]
    assert 0 < max_difference(plain["model"], torch.load(world / "plain/checkpoints/step_000002.pt",
                                                         weights_only=True)["model"])  # the weights moved
    assert max_difference(sharded["model"], plain["model"]) < 1e-5
    # AdamW's moments, gathered: keyed by parameter name, the unsharded run's values (keyed by index
    # in its two groups: decayed parameters, then the others, each in named_parameters order)
    from mmssl.train.optim import uses_weight_decay

    named = list(mmssl.create_model(str(world / "plain/checkpoints/latest.pt")).named_parameters())
    order = [f"model.{n}" for n, p in named if uses_weight_decay(n, p)] + \
            [f"model.{n}" for n, p in named if not uses_weight_decay(n, p)]
    moments = sharded["optimizer"]["state"]
    assert sorted(moments) == sorted(order)
    by_name = {order[index]: value for index, value in plain["optimizer"]["state"].items()}
    assert max(max_difference(moments[name], by_name[name]) for name in order) < 1e-5


@needs_torchrun
def test_fsdp_checkpoint_loads_in_one_process(world, adamw_runs):
    _, sharded, _ = adamw_runs
    model = mmssl.create_model(str(world / "sharded/checkpoints/latest.pt"))
    state = model.state_dict()
    assert not any(type(value).__name__ == "DTensor" for value in sharded["model"].values())
    assert max_difference(state, sharded["model"]) == 0.0   # every key, full shape, bit for bit
    with torch.no_grad():
        assert model.encode_image(torch.zeros(2, 3, 32, 32)).shape == (2, 32)


@needs_torchrun
def test_fsdp_resume_equals_uninterrupted_run(world, adamw_runs):
    """A run stopped after step 2 (its step-2 checkpoint) and resumed ends where the uninterrupted one did."""
    _, sharded, extra = adamw_runs
    stopped = world / "sharded/checkpoints/step_000002.pt"
    resumed = train_ok(world, "resumed", *extra, "train.fsdp=true", f"train.resume={stopped}")
    assert max_difference(resumed["model"], sharded["model"]) <= 1e-6
    assert losses(world, "resumed") == pytest.approx(losses(world, "sharded")[2:], abs=1e-6)
    moments = sharded["optimizer"]["state"]
    assert max(max_difference(resumed["optimizer"]["state"][name], moments[name]) for name in moments) <= 1e-6


@needs_torchrun
def test_fsdp_muon_equals_unsharded_run(world):
    """Muon orthogonalizes each gathered block matrix whole: without clipping (whose norm is summed in
    another order, and Newton-Schulz magnifies such rounding) the run is the unsharded one bit for bit."""
    extra = ["train.optimizer=muon", "train.grad_clip=null", "train.steps=2", "train.save_every=0"]
    plain = train_ok(world, "muon_plain", *extra)
    sharded = train_ok(world, "muon_sharded", *extra, "train.fsdp=true")
    assert losses(world, "muon_sharded") == losses(world, "muon_plain")
    assert max_difference(sharded["model"], plain["model"]) == 0.0


@pytest.mark.parametrize("extra, message", [
    (["loss.kind=moco"], "train.fsdp=true does not support a momentum encoder"),
    (["loss.queue_size=64"], "train.fsdp=true does not support a momentum encoder"),
    (["train.compile=true"], "train.fsdp=true does not support train.compile=true"),
    (["train.val_every=2", "data.val=x"], "train.fsdp=true does not support train.val_every"),
])
def test_fsdp_refuses_what_it_cannot_shard(world, tmp_path, capsys, extra, message):
    code = main(["train", "--config", "tiny", f"model.name={world / 'micro.json'}", f"data.train={world / 'syn/train'}",
                 f"train.output={tmp_path / 'run'}", *RUN, "train.fsdp=true", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_fsdp_in_one_process_trains_unsharded(world, tmp_path, capsys):
    assert main(["train", "--config", "tiny", f"model.name={world / 'micro.json'}", f"data.train={world / 'syn/train'}",
                 f"train.output={tmp_path / 'run'}", *RUN, "train.steps=1", "train.fsdp=true", "train.threads=1"]) == 0
    assert "train.fsdp=true in a single process: nothing to shard, training unsharded" in capsys.readouterr().err
    saved = torch.load(tmp_path / "run/checkpoints/latest.pt", weights_only=True)
    assert "fsdp" not in saved and isinstance(next(iter(saved["optimizer"]["state"])), int)


def test_fsdp_checkpoint_resumes_only_with_fsdp():
    """An FSDP checkpoint's optimizer state is keyed by parameter name: the other format is refused."""
    from mmssl.errors import UserError
    from mmssl.train.fsdp import check_resume

    check_resume("a.pt", {"fsdp": True}, sharded=True)
    check_resume("a.pt", {}, sharded=False)
    with pytest.raises(UserError, match=r"a.pt was written with train.fsdp=true under torchrun; resume it with "
                                        r"the same train.fsdp \(now false\)"):
        check_resume("a.pt", {"fsdp": True}, sharded=False)
    with pytest.raises(UserError, match=r"train.fsdp=false .* \(now true\)"):
        check_resume("a.pt", {}, sharded=True)


def test_fsdp_key_is_a_bool():
    from mmssl.config import load_config
    from mmssl.errors import UserError

    assert load_config("tiny", ["train.fsdp=true"]).train.fsdp is True
    assert load_config("tiny").train.fsdp is False
    with pytest.raises(UserError, match="bad value for train.fsdp"):
        load_config("tiny", ["train.fsdp=3"])


def test_fsdp_shards_the_towers_blocks(tmp_path):
    """The FSDP units: each transformer block of both towers, each ResNet stage; nothing else."""
    from helpers import micro_model_config
    from mmssl.train.fsdp import shard_blocks

    def units(model):
        names = {id(module): name for name, module in model.named_modules()}
        return [names[id(block)] for block in shard_blocks(model)]

    vit = mmssl.create_model(str(write_micro_model(tmp_path)))
    assert units(vit) == ["visual.transformer.resblocks.0", "visual.transformer.resblocks.1",
                          "transformer.resblocks.0", "transformer.resblocks.1"]
    inside = sum(p.numel() for block in shard_blocks(vit) for p in block.parameters())
    assert inside > 0.5 * sum(p.numel() for name, p in vit.named_parameters() if "token_embedding" not in name)
    resnet = mmssl.create_model(str(write_micro_model(tmp_path, micro_model_config(
        vision={"layers": [1, 1, 1, 1], "width": 16, "head_width": 16}), name="rn.json")))
    assert units(resnet)[:4] == ["visual.layer1", "visual.layer2", "visual.layer3", "visual.layer4"]
