"""Interrupted prep: no partial tar is ever visible, and --resume gives the uninterrupted bytes."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from data_prep import csv_source, synthetic
from mmssl.cli import main


def _dataset_files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def table(tmp_path):
    lines = ["image,caption"]
    for i in range(28):
        pixels = np.random.default_rng(i).integers(0, 256, (24, 30, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.jpg")
        lines.append(f"{i}.jpg,image number {i}" if i % 9 else f"{i}.jpg,")  # every 9th: empty caption
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "t.csv"


def test_resume_redoes_exactly_the_unfinished_shards(tmp_path, table):
    kwargs = dict(image_size=16, shard_size=5, workers=1, quiet=True)
    reference = csv_source.prepare(table, tmp_path / "full", **kwargs)
    assert (reference["num_samples"], reference["num_failures"]) == (24, 4)
    expected = _dataset_files(tmp_path / "full")

    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "full", broken)
    (broken / "00005.tar").unlink()                 # killed before the last shard was renamed
    (broken / "00005_stats.json").unlink()
    (broken / "00005.tar.tmp").write_bytes(b"half a tar")
    (broken / "00003_stats.json").unlink()          # killed between a tar's rename and its stats
    (broken / "00003.tar").write_bytes(b"stale")
    for name in ("manifest.json", "failures.jsonl", "sizes.json"):
        (broken / name).unlink()
    untouched = (broken / "00001.tar").stat().st_mtime_ns
    csv_source.prepare(table, broken, resume=True, **kwargs)
    assert _dataset_files(broken) == expected
    assert (broken / "00001.tar").stat().st_mtime_ns == untouched  # finished shards are not rewritten


def test_resume_with_other_options_is_refused(tmp_path, table, capsys):
    csv_source.prepare(table, tmp_path / "out", image_size=16, shard_size=5, workers=1, quiet=True)
    argv = ["prep", "csv", "--input", str(table), "--out", str(tmp_path / "out"), "--image-size", "20",
            "--shard-size", "5", "--workers", "1", "--quiet", "--resume"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "--overwrite" in err and err.count("\n") == 1


def test_killed_run_leaves_only_whole_shards_and_resumes_byte_identical(tmp_path):
    sizes = dict(num_train=3000, num_val=10, num_heldout=10, shard_size=100)
    synthetic.generate(tmp_path / "reference", seed=5, workers=1, quiet=True, **sizes)
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "mmssl", "prep", "synthetic", "--out", str(out), "--seed", "5", "--workers", "1",
            "--quiet"] + [f"--{k.replace('_', '-')}={v}" for k, v in sizes.items()]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (out / "train" / "00000_stats.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    assert not (out / "train" / "manifest.json").exists()  # it really was interrupted
    finished = sorted(p.name for p in (out / "train").glob("*.tar"))
    assert finished and len(finished) < 30
    for name in finished:  # every visible tar is whole: byte-equal to the uninterrupted run's
        assert (out / "train" / name).read_bytes() == (tmp_path / "reference" / "train" / name).read_bytes()

    assert main(argv[3:] + ["--resume"]) == 0
    assert not list(out.rglob("*.tmp"))
    for split in ("train", "val", "heldout"):
        assert _dataset_files(out / split) == _dataset_files(tmp_path / "reference" / split)
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    assert manifest["num_samples"] == 3000 and len(manifest["shards"]) == 30
