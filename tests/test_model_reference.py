"""mmssl.models.refs: every model reference parses to one ModelRef, records one canonical form, and
every entry point that reads a checkpoint fails with the same one-line message for the same file."""
from pathlib import Path

import pytest
import torch

import mmssl
from mmssl.cli import main
from mmssl.config import ExperimentConfig, ModelConfig, to_dict
from mmssl.errors import UserError
from mmssl.models import refs
from mmssl.models.refs import ModelRef, checkpoint_ref, parse_ref, read_checkpoint
from mmssl.train import checkpoint as ckpt

from helpers import write_micro_model


@pytest.fixture
def run(tmp_path):
    """A training run folder: checkpoints/step_000003.pt of a micro model, latest.pt pointing at it."""
    model_cfg = ModelConfig(name=str(write_micro_model(tmp_path)))
    torch.manual_seed(0)
    model = mmssl.create_model(model_cfg)
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    state = {"model": model.state_dict(), "config": to_dict(ExperimentConfig(model=model_cfg)),
             "optimizer": {}, "scheduler": {}, "step": 3, "version": 1}
    torch.save(state, folder / "step_000003.pt")
    (folder / refs.LATEST).symlink_to("step_000003.pt")
    return tmp_path / "run"


def test_each_kind_parses_to_its_ref(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_ref("tiny-vit-64") == ModelRef("name", name="tiny-vit-64")
    assert parse_ref("ViT-B-32") == ModelRef("name", name="ViT-B-32")
    assert parse_ref("cfg/my.json") == ModelRef("config", path=Path("cfg/my.json"))
    for file in ("a/step_000001.pt", "w.pth", "w.ckpt"):
        assert parse_ref(file) == ModelRef("checkpoint", path=Path(file))
    assert parse_ref(Path("w.pt")) == ModelRef("checkpoint", path=Path("w.pt"))
    assert parse_ref("openclip:ViT-B-32") == ModelRef("openclip", name="ViT-B-32")
    assert parse_ref("openclip:tiny-vit-64:w/x.bin") == ModelRef("openclip", name="tiny-vit-64", weights=Path("w/x.bin"))
    (tmp_path / "r" / "checkpoints").mkdir(parents=True)
    assert parse_ref("r") == ModelRef("run", path=Path("r") / refs.CHECKPOINT_DIR / refs.LATEST)
    ref = parse_ref("openclip:tiny-vit-64:w/x.bin")
    assert ref == parse_ref(ref)  # a ModelRef passes through unchanged
    with pytest.raises(UserError, match=r"^openclip: needs a model name: openclip:NAME\[:WEIGHTS\]$"):
        parse_ref("openclip:")


def test_canonical_form_and_pretrained_label(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_ref("w.pt").canonical == str(tmp_path / "w.pt")
    assert parse_ref("w.pt").pretrained == "w.pt"
    assert parse_ref("openclip:tiny-vit-64:w/x.bin").canonical == f"openclip:tiny-vit-64:{tmp_path / 'w' / 'x.bin'}"
    assert parse_ref("openclip:tiny-vit-64:w/x.bin").pretrained == "w/x.bin"
    assert parse_ref("openclip:tiny-vit-64").canonical == "openclip:tiny-vit-64"
    assert parse_ref("openclip:tiny-vit-64").pretrained == "random-init"
    assert parse_ref("cfg/my.json").canonical == str(tmp_path / "cfg" / "my.json")
    assert (parse_ref("tiny-vit-64").canonical, parse_ref("tiny-vit-64").pretrained) == ("tiny-vit-64", "random-init")


def test_run_folder_resolves_through_latest(run, tmp_path):
    assert ckpt.LATEST is refs.LATEST and ckpt.checkpoint_dir(run) == run / refs.CHECKPOINT_DIR
    ref = checkpoint_ref(str(run))
    assert ref == ModelRef("run", path=run / "checkpoints" / "latest.pt")
    assert parse_ref(run / "checkpoints") == ref  # the checkpoints folder itself names the same file
    assert ref.canonical == str(run / "checkpoints" / "step_000003.pt")  # what index_info.json pins
    assert ref.pretrained == str(run / "checkpoints" / "latest.pt")
    assert read_checkpoint(ref.path)["step"] == 3
    from eval.embed import load_model

    loaded = load_model(str(run), "fp32")
    assert (loaded.name, loaded.pretrained) == ("micro", str(run / "checkpoints" / "latest.pt"))
    (run / "checkpoints" / "latest.pt").unlink()
    with pytest.raises(UserError, match=f"^no checkpoint in {run} \\(expected checkpoints/latest.pt\\)$"):
        checkpoint_ref(str(run))


def _bad_files(tmp_path):
    """(reference, the one error line every entry point must print for it)."""
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    missing = tmp_path / "missing.pt"
    return [
        (str(missing), f"checkpoint not found: {missing}"),
        (f"openclip:tiny-vit-64:{missing}", f"weights file not found: {missing}"),
        (str(junk), f"cannot read checkpoint {junk} (UnpicklingError)"),
        (str(foreign), f"{foreign} is not an mmssl checkpoint (missing model, config)"),
    ]


def test_every_entry_point_prints_the_same_line(tmp_path, capsys):
    entry_points = {
        "eval": ["eval", "zeroshot", "--data", str(tmp_path), "--checkpoint"],
        "index": ["index", "build", "--data", str(tmp_path), "--out", str(tmp_path / "index"), "--checkpoint"],
        "export": ["export", "--out", str(tmp_path / "export"), "--checkpoint"],
    }
    for reference, line in _bad_files(tmp_path):
        for name, argv in entry_points.items():
            assert main(argv + [reference]) == 2, (name, reference)
            captured = capsys.readouterr()
            assert captured.err == f"mmssl: error: {line}\n", (name, reference)
        with pytest.raises(UserError) as raised:
            mmssl.create_model(reference)
        assert str(raised.value) == line
    assert not (tmp_path / "index").exists() and not (tmp_path / "export").exists()


def test_readers_share_the_messages(tmp_path):
    missing, _, (junk, junk_line), (foreign, _) = _bad_files(tmp_path)
    with pytest.raises(UserError, match=f"^checkpoint not found: {missing[0]}$"):
        read_checkpoint(missing[0])
    for read in (read_checkpoint, ckpt.load_checkpoint):
        with pytest.raises(UserError) as raised:
            read(junk)
        assert str(raised.value) == junk_line
    with pytest.raises(UserError) as raised:
        ckpt.load_checkpoint(foreign)  # resume needs the training state as well
    assert str(raised.value) == f"{foreign} is not an mmssl checkpoint (missing model, optimizer, scheduler, step)"
    with pytest.raises(UserError) as raised:  # model.pretrained reads through the same module
        mmssl.create_model(str(write_micro_model(tmp_path)), pretrained=str(junk))
    assert str(raised.value) == f"cannot read weights file {junk} (UnpicklingError)"


def test_export_refuses_a_model_that_is_not_a_checkpoint(tmp_path, capsys):
    assert main(["export", "--checkpoint", "openclip:tiny-vit-64", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == (
        "mmssl: error: --checkpoint openclip:tiny-vit-64: export takes an mmssl checkpoint or a run folder\n")
