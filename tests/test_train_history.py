"""A run folder's history is never silently lost: fresh starts into a used folder are refused,
`resume=latest` survives a broken latest.pt, metrics.jsonl is cut back to the resumed step, a
failed save leaves the previous checkpoint whole, and only the newest N checkpoints are kept."""
import errno
import json
import os
import stat

import pytest
import torch

from helpers import config, logged_losses
from mmssl.cli import main
from mmssl.errors import UserError
from mmssl.train import checkpoint as ckpt
from mmssl.train.loop import train
from mmssl.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(world, output, *extra):
    return train(config(world, output, "data.workers=0", *extra))


def _steps_on_disk(output):
    return sorted(int(p.name[5:11]) for p in ckpt.step_files(output))


def test_a_fresh_start_into_a_used_folder_is_refused_unless_overwrite(world, tmp_path, capsys):
    out = tmp_path / "run"
    _run(world, out, "train.steps=4", "train.save_every=2")
    before = (out / "metrics.jsonl").read_bytes(), (out / "checkpoints" / "step_000004.pt").read_bytes()
    with pytest.raises(UserError, match="already holds a training run"):
        _run(world, out, "train.steps=4")
    argv = ["train", "--config", "tiny", f"model.name={world / 'micro.json'}", f"data.train={world / 'syn' / 'train'}",
            f"train.output={out}", "train.steps=2", "train.batch_size=16"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.overwrite=true" in err and "train.resume=latest" in err
    assert ((out / "metrics.jsonl").read_bytes(), (out / "checkpoints" / "step_000004.pt").read_bytes()) == before

    (out / "notes.txt").write_text("mine")
    again = _run(world, out, "train.steps=3", "train.overwrite=true")
    assert again.step == 3 and _steps_on_disk(out) == [3]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    assert (out / "notes.txt").read_text() == "mine"  # overwrite removes only what a run writes
    with pytest.raises(UserError, match="set only one"):
        _run(world, out, "train.steps=3", "train.overwrite=true", "train.resume=latest")


def test_resume_latest_falls_back_to_the_newest_readable_checkpoint(world, tmp_path, capsys):
    straight = tmp_path / "straight"
    _run(world, straight, "train.steps=6")
    out = tmp_path / "run"
    _run(world, out, "train.steps=4", "train.save_every=2")
    latest = out / "checkpoints" / "latest.pt"
    (out / "checkpoints" / "step_000004.pt").write_bytes(b"torn by a crash")  # latest points at it
    capsys.readouterr()
    resumed = _run(world, out, "train.steps=6", "train.resume=latest")
    err = capsys.readouterr().err
    assert "latest.pt is unreadable" in err and "resuming from" in err and "step_000002.pt" in err
    assert resumed.step == 6 and len(resumed.losses) == 4  # steps 3..6 redone from step 2
    assert logged_losses(out) == logged_losses(straight)

    latest.unlink()
    os.symlink("step_000099.pt", latest)  # a dangling link: the target was deleted
    resumed = _run(world, out, "train.steps=7", "train.resume=latest")
    assert "points to a missing file" in capsys.readouterr().err and resumed.step == 7

    for path in ckpt.step_files(out):
        path.write_bytes(b"junk")
    with pytest.raises(UserError, match="no readable checkpoint"):
        _run(world, out, "train.steps=8", "train.resume=latest")


def test_resume_cuts_metrics_back_to_the_resumed_step_even_after_a_torn_line(world, tmp_path):
    straight = tmp_path / "straight"
    _run(world, straight, "train.steps=6")
    out = tmp_path / "run"
    _run(world, out, "train.steps=4", "train.save_every=2")
    (out / "checkpoints" / "step_000004.pt").unlink()
    (out / "checkpoints" / "latest.pt").unlink()
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "loss": 1.2')  # killed in the middle of writing a record
    _run(world, out, "train.steps=6", "train.resume=latest")
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # 3 and 4 once each, from the resumed run
    assert logged_losses(out) == logged_losses(straight)


def test_a_failed_save_leaves_no_temp_file_and_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    state = {"model": {"w": torch.ones(3)}, "optimizer": {}, "scheduler": {}}
    first = ckpt.save_checkpoint(tmp_path, 2, state)
    original_save = torch.save

    def disk_full(obj, handle, *args, **kwargs):
        handle.write(b"x" * 1000)  # part of the file reaches the disk, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match="cannot save checkpoint .*step_000004.pt: No space left on device") as err:
        ckpt.save_checkpoint(tmp_path, 4, state)
    assert "\n" not in str(err.value)
    monkeypatch.setattr(torch, "save", original_save)
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["latest.pt", "step_000002.pt"]
    assert (folder / "latest.pt").resolve() == first.resolve()
    assert torch.equal(ckpt.load_checkpoint(folder / "latest.pt")["model"]["w"], torch.ones(3))


def test_leftover_temp_files_of_a_killed_save_are_removed_at_start(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / ".step_000010.pt.tmp4242").write_bytes(b"half")
    (folder / ".latest.pt.tmp4242").write_bytes(b"")
    (folder / "keep-me.txt").write_text("not ours")
    assert ckpt.start_point(tmp_path, "latest") is None
    assert sorted(p.name for p in folder.iterdir()) == ["keep-me.txt"]


def test_keep_checkpoints_keeps_the_newest_n(world, tmp_path):
    out = tmp_path / "run"
    _run(world, out, "train.steps=8", "train.save_every=2", "train.keep_checkpoints=2")
    assert _steps_on_disk(out) == [6, 8]
    assert (out / "checkpoints" / "latest.pt").resolve().name == "step_000008.pt"
    with pytest.raises(UserError, match="train.keep_checkpoints"):
        _run(world, tmp_path / "bad", "train.steps=2", "train.keep_checkpoints=-1")


def test_saves_fsync_the_file_and_the_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    ckpt.save_checkpoint(tmp_path, 1, {"model": {}, "optimizer": {}, "scheduler": {}})
    assert synced[0] is False and synced.count(True) >= 2  # the file, then the folder after each rename


def test_metrics_reader_refuses_a_malformed_middle_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1}) + "\nnot json\n" + json.dumps({"step": 2}) + "\n")
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)
