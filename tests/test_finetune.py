"""`mmssl finetune` / `mmssl wise` / `mmssl eval classify`: the zero-shot start, WiSE-FT's end points,
exact accumulation and resume, LP-FT, FLYP's derived head, and the one-line errors."""
import json
from argparse import Namespace

import pytest
import torch

from helpers import CPU, accumulation_matches, close_process_group, exit_code, write_micro_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def source(world):
    """A random-init micro checkpoint (the zero-shot start of every fine-tune here)."""
    return write_micro_checkpoint(world / "ckpt" / "micro.pt", seed=3)


def tune_args(world, source, out, *overrides, train=None, val=None, **options):
    return Namespace(checkpoint=str(source), train=str(train or world / "syn" / "labelled"),
                     val=str(val or world / "syn" / "heldout"), out=str(out), config="finetune",
                     objective=options.pop("objective", None), classnames=None, templates=None,
                     wise=options.pop("wise", None), shift=options.pop("shift", []), wise_alpha=0.5,
                     eval_batch_size=64, workers=0,
                     overrides=["train.batch_size=16", "train.warmup=2", "train.log_every=1", "train.save_every=0",
                                "train.precision=fp32", "train.threads=1", "data.workers=0",
                                "data.shuffle_buffer=32", *overrides], **options)


def cli(world, source, out, *overrides, train=None, val=None):
    return ["finetune", "--checkpoint", str(source), "--train", str(train or world / "syn" / "labelled"),
            "--val", str(val or world / "syn" / "heldout"), "--out", str(out), "--workers", "0",
            "train.batch_size=16", "train.warmup=2", "train.log_every=1", "train.precision=fp32",
            "train.threads=1", "data.workers=0", "data.shuffle_buffer=32", *overrides]


def result_of(argv, capsys) -> dict:
    assert exit_code(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_step_zero_predicts_exactly_what_zero_shot_predicts(world, source, tmp_path, capsys):
    from eval.embed import embed_images, load_model, open_eval_data
    from eval.zeroshot import run_zeroshot
    from mmssl.finetune.run import build_finetuner

    trainer, start = build_finetuner(_resolved(tune_args(world, source, tmp_path / "ft", "train.steps=1")),
                                     tune_args(world, source, tmp_path / "ft"), CPU)
    loaded = load_model(str(source), "fp32")
    data = str(world / "syn" / "heldout")
    zeroshot = run_zeroshot(loaded, data, batch_size=64, workers=0)
    embedded = embed_images(loaded, open_eval_data(data, loaded.transform, 64, 0))
    with torch.no_grad():
        head_logits = trainer.objective.head(torch.from_numpy(embedded.features)).numpy()
    scale = loaded.model.logit_scale.exp().item()
    # the head is the zero-shot classifier times the logit scale: same scores, same predictions
    assert head_logits == pytest.approx(zeroshot["logits"] * scale, abs=1e-4)
    assert (head_logits.argmax(1) == zeroshot["logits"].argmax(1)).all()
    assert start["classnames"] == (world / "syn" / "val" / "classnames.txt").read_text().splitlines()

    # end to end: the WiSE-FT alpha=0 checkpoint classifies like zero-shot, through `eval classify`
    out = tmp_path / "run"
    assert exit_code(cli(world, source, out, "train.steps=2", "--wise", "0,1", "--wise-alpha", "0")) == 0
    capsys.readouterr()
    classified = result_of(["eval", "classify", "--checkpoint", str(out / "wise" / "alpha_0.pt"), "--data", data,
                            "--precision", "fp32", "--workers", "0"], capsys)
    plain = result_of(["eval", "zeroshot", "--checkpoint", str(source), "--data", data, "--precision", "fp32",
                       "--workers", "0"], capsys)
    assert classified["task"] == "classification"
    assert classified["metrics"]["acc1"] == plain["metrics"]["acc1"]
    assert classified["metrics"]["acc5"] == plain["metrics"]["acc5"]
    curve = json.loads((out / "wise" / "curve.json").read_text())
    assert [p["alpha"] for p in curve["points"]] == [0.0, 1.0]
    assert curve["points"][0]["id_acc1"] == plain["metrics"]["acc1"]
    # eval zeroshot of a fine-tuned checkpoint goes through its head
    through_head = result_of(["eval", "zeroshot", "--checkpoint", str(out), "--data", data, "--precision", "fp32",
                              "--workers", "0"], capsys)
    final = result_of(["eval", "classify", "--checkpoint", str(out), "--data", data, "--precision", "fp32",
                       "--workers", "0"], capsys)
    assert through_head["classifier"] == "finetuned head"
    assert through_head["metrics"] == final["metrics"]
    assert curve["points"][-1]["id_acc1"] == final["metrics"]["acc1"]


def _resolved(args):
    """The config `mmssl finetune` builds from its arguments (as mmssl.finetune.run.finetune does)."""
    import dataclasses

    from mmssl.config import load_config

    cfg = load_config(args.config, args.overrides)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=args.train, val=args.val),
                               train=dataclasses.replace(cfg.train, output=args.out))


def test_wise_end_points_are_the_inputs_bit_for_bit_and_the_middle_is_the_mean():
    from mmssl.finetune.wise import interpolate

    zeroshot = {"w": torch.tensor([1.0, -0.0, 3.5, 1e-30]), "n": torch.tensor([2]), "h": torch.ones(2, dtype=torch.bfloat16)}
    tuned = {"w": torch.tensor([0.0, 0.0, -1.25, 7.0]), "n": torch.tensor([5]), "h": torch.zeros(2, dtype=torch.bfloat16)}
    for alpha, expected in ((0.0, zeroshot), (1.0, tuned)):
        mixed = interpolate(zeroshot, tuned, alpha)
        for key in expected:
            if key == "n":
                assert mixed[key].item() == 5          # integer buffers come from the fine-tuned model
            else:
                assert torch.equal(mixed[key].view(torch.int16 if key == "h" else torch.int32),
                                   expected[key].view(torch.int16 if key == "h" else torch.int32)), (alpha, key)
    assert interpolate(zeroshot, tuned, 0.5)["w"].tolist() == pytest.approx([0.5, 0.0, 1.125, 3.5])


def test_mmssl_wise_writes_the_interpolated_checkpoint(world, source, tmp_path):
    out = tmp_path / "run"
    assert exit_code(cli(world, source, out, "train.steps=2")) == 0
    tuned = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)
    start = torch.load(source, weights_only=True)
    half = tmp_path / "half.pt"
    assert exit_code(["wise", "--zeroshot", str(source), "--finetuned", str(out), "--alpha", "0.25",
                      "--out", str(half)]) == 0
    mixed = torch.load(half, weights_only=True)
    name = "visual.conv1.weight"
    assert torch.allclose(mixed["model"][name], 0.75 * start["model"][name] + 0.25 * tuned["model"][name], atol=1e-7)
    assert not torch.equal(tuned["model"][name], start["model"][name])
    assert mixed["wise_alpha"] == 0.25
    assert exit_code(["wise", "--zeroshot", str(source), "--finetuned", str(out), "--alpha", "1.5",
                      "--out", str(half)]) == 2


@pytest.mark.parametrize("objective", ["ce", "contrastive"])
def test_accumulation_is_exact(world, source, tmp_path, objective):
    from mmssl.finetune.run import build_finetuner

    args = tune_args(world, source, tmp_path / objective, f"finetune.objective={objective}")
    trainer, _ = build_finetuner(_resolved(args), args, CPU)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(12, 3, 32, 32, generator=generator)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3, 47, 5, 0, 0])
    grads = accumulation_matches(trainer.objective.train(), images, labels)
    touched = {name.split(".")[0] for name in grads}
    assert touched == ({"head", "model"} if objective == "ce" else {"model"})
    if objective == "ce":   # CE trains the image tower and the head; the text tower is frozen
        assert all(name.startswith(("model.visual.", "head.")) for name in grads)
    else:                    # FLYP trains both towers (its head is derived from the text tower)
        assert any(name.startswith("model.transformer.") for name in grads)


def test_resume_is_exact(world, source, tmp_path):
    from helpers import logged_losses
    from mmssl.finetune.run import build_finetuner

    straight_args = tune_args(world, source, tmp_path / "straight", "train.steps=6")
    straight = build_finetuner(_resolved(straight_args), straight_args, CPU)[0].fit()
    args = tune_args(world, source, tmp_path / "split", "train.steps=6", "train.save_every=3")
    first = build_finetuner(_resolved(args), args, CPU)[0]
    first.cfg.steps = 3
    first.fit()
    args = tune_args(world, source, tmp_path / "split", "train.steps=6", "train.resume=latest")
    resumed = build_finetuner(_resolved(args), args, CPU)[0].fit()
    assert resumed.losses == straight.losses[3:]
    assert logged_losses(tmp_path / "split") == logged_losses(tmp_path / "straight")


def test_lp_ft_trains_the_head_alone_first(world, source, tmp_path):
    from mmssl.finetune.run import build_finetuner

    args = tune_args(world, source, tmp_path / "lp", "train.steps=4", "finetune.lp_steps=3")
    trainer, start = build_finetuner(_resolved(args), args, CPU)
    trainer.cfg.steps = 3
    trainer.fit()
    visual = {k: v for k, v in trainer.objective.model.state_dict().items() if k.startswith("visual.")}
    assert all(torch.equal(value, start["model"][key]) for key, value in visual.items())
    assert not torch.equal(trainer.objective.head.weight, start["head"]["weight"])
    trainer.cfg.steps = 4
    trainer.fit()     # step 4: everything trains
    assert not torch.equal(trainer.objective.model.state_dict()["visual.conv1.weight"], start["model"]["visual.conv1.weight"])


def test_flyp_head_is_the_fine_tuned_text_towers_zero_shot_classifier(world, source, tmp_path, capsys):
    out = tmp_path / "flyp"
    assert exit_code(cli(world, source, out, "train.steps=3", "--objective", "contrastive")) == 0
    data = str(world / "syn" / "heldout")
    head = result_of(["eval", "classify", "--checkpoint", str(out), "--data", data, "--precision", "fp32",
                      "--workers", "0"], capsys)
    text = result_of(["eval", "zeroshot", "--checkpoint", str(out), "--data", data, "--precision", "fp32",
                      "--workers", "0", "--templates", str(world / "syn" / "val" / "templates.txt")], capsys)
    assert "classifier" not in text                      # --templates: the text tower, not the head
    assert head["metrics"] == text["metrics"]
    tuned = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)
    start = torch.load(world / "ckpt" / "micro.pt", weights_only=True)
    assert not torch.equal(tuned["model"]["token_embedding.weight"], start["model"]["token_embedding.weight"])


def test_bad_inputs_exit_2_with_one_line(world, source, tmp_path, capsys):
    unlabelled = cli(world, source, tmp_path / "a", "train.steps=1", train=world / "syn" / "train")
    assert exit_code(unlabelled) == 2
    assert "no class label" in _one_line(capsys)

    other = tmp_path / "other_val"
    other.mkdir()
    for file in (world / "syn" / "heldout").iterdir():
        (other / file.name).write_bytes(file.read_bytes())
    (other / "classnames.txt").write_text("a\nb\nc\n")
    assert exit_code(cli(world, source, tmp_path / "b", "train.steps=1", val=other)) == 2
    assert "class count mismatch" in _one_line(capsys)

    text_free = tmp_path / "simclr.pt"
    payload = torch.load(source, weights_only=True)
    payload["config"]["loss"]["kind"] = "simclr"
    torch.save(payload, text_free)
    assert exit_code(cli(world, text_free, tmp_path / "c", "train.steps=1")) == 2
    assert "needs a text tower" in _one_line(capsys)

    assert exit_code(cli(world, source, tmp_path / "d", "finetune.lp_steps=2", "finetune.objective=contrastive")) == 2
    assert "LP-FT needs finetune.objective=ce" in _one_line(capsys)
    assert exit_code(["eval", "classify", "--checkpoint", str(source), "--data", str(world / "syn" / "val")]) == 2
    assert "has no class head" in _one_line(capsys)

    assert exit_code(cli(world, source, tmp_path / "e", "train.steps=1", "--wise", "0:1:0.001")) == 2
    assert "gives 1001 alphas (1..101)" in capsys.readouterr().err
    assert exit_code(["wise", "--zeroshot", str(source), "--finetuned", str(source), "--alpha", "0.5",
                      "--out", str(tmp_path / "w.pt")]) == 2
    assert "has no class heads" in _one_line(capsys)
    assert not (tmp_path / "w.pt").exists()


def test_a_hostile_class_head_is_refused_in_one_line(world, source, tmp_path, capsys):
    out = tmp_path / "run"
    assert exit_code(cli(world, source, out, "train.steps=1")) == 0
    capsys.readouterr()
    payload = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)
    data = str(world / "syn" / "heldout")
    for name, change in (("names", lambda p: p["config"]["finetune"].update(classnames=["a", "b"])),
                         ("shape", lambda p: p["heads"]["classifier"].update(weight=torch.zeros(48))),
                         ("type", lambda p: p["heads"].update(classifier=[1, 2, 3]))):
        hostile = {**payload, "config": {**payload["config"], "finetune": dict(payload["config"]["finetune"])},
                   "heads": {key: dict(value) if isinstance(value, dict) else value
                             for key, value in payload["heads"].items()}}
        change(hostile)
        path = tmp_path / f"{name}.pt"
        torch.save(hostile, path)
        assert exit_code(["eval", "classify", "--checkpoint", str(path), "--data", data, "--workers", "0"]) == 2, name
        assert "does not match its finetune.classnames" in _one_line(capsys), name


def test_out_of_range_training_labels_stop_with_a_clear_error(world, source, tmp_path):
    from mmssl.errors import UserError
    from mmssl.finetune.run import build_finetuner

    args = tune_args(world, source, tmp_path / "range")
    trainer, _ = build_finetuner(_resolved(args), args, CPU)
    with pytest.raises(UserError, match="training label 48 is out of range for the 48 classes"):
        trainer.objective(torch.zeros(2, 3, 32, 32), torch.tensor([0, 48]), step=0)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("mmssl: error:"), err
    return err


def _average_worker(rank, port, out_dir):
    import torch.distributed as dist

    from mmssl.train.distributed import DistEnv
    from mmssl.train.loop import _average_gradients

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(3)]
    params[0].grad = torch.full((3,), float(rank + 1))          # on both ranks
    if rank == 0:
        params[1].grad = torch.full((3,), 4.0)                   # on one rank only
    _average_gradients(params, DistEnv(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu")))
    torch.save([None if p.grad is None else p.grad.tolist() for p in params], f"{out_dir}/rank{rank}.pt")
    close_process_group()


def test_gradient_average_keeps_a_gradient_no_rank_has_as_none(tmp_path):
    """LP-FT's head-only steps: the tower has no gradient on any rank, so AdamW must skip it (a zero
    gradient would still apply weight decay and momentum)."""
    import torch.multiprocessing as mp

    from helpers import free_port

    mp.spawn(_average_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == [[1.5] * 3, [2.0] * 3, None]
