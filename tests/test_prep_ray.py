"""`mmssl prep --engine ray` on a real 2-node Ray cluster: one task per shard, the same bytes as the
local engine in every file, and `--resume` redoes only the unfinished shards."""
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from data_prep import pipeline
from data_prep.synthetic import SceneRenderer
from mmssl.cli import main


def _dataset_files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def table(tmp_path):
    """30 rows (4 shards of 8): row 4's image is missing, row 11's is not an image, row 25 has no caption."""
    images = tmp_path / "images"
    images.mkdir()
    lines = ["image,caption,score"]
    for i in range(30):
        if i == 4:
            lines.append("gone.jpg,a missing file,0.4")
            continue
        pixels = np.random.default_rng(i).integers(0, 256, (20 + i, 28, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
        lines.append(f"{i}.png,{'' if i == 25 else f'picture {i}'},{i / 10}")
    (images / "11.png").write_bytes(b"not an image at all" * 4)
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "t.csv"


def _prep_csv(table, out, *extra):
    return main(["prep", "csv", "--input", str(table), "--image-root", str(table.parent / "images"),
                 "--out", str(out), "--image-size", "16",
                 "--shard-size", "8", *extra])


def test_csv_on_ray_writes_the_local_bytes(tmp_path, table, ray_cluster, capsys):
    assert _prep_csv(table, tmp_path / "local", "--engine", "local", "--workers", "1", "--quiet") == 0
    capsys.readouterr()
    assert _prep_csv(table, tmp_path / "ray", "--engine", "ray") == 0
    captured = capsys.readouterr()
    assert "prep csv: 30 rows in, 27 written, 3 failed" in captured.out
    assert "prep csv: 4 shard(s) written by Ray tasks on " in captured.err  # one task per shard

    local, ray = _dataset_files(tmp_path / "local"), _dataset_files(tmp_path / "ray")
    assert sorted(local) == ["00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json", "00002.tar",
                             "00002_stats.json", "00003.tar", "00003_stats.json", "failures.jsonl",
                             "manifest.json", "sizes.json"]
    assert ray == local
    failures = [json.loads(line) for line in (tmp_path / "ray" / "failures.jsonl").read_text().splitlines()]
    assert [f["row"] for f in failures] == [4, 11, 25]
    assert failures[0]["reason"].startswith("missing file:") and failures[0]["reason"].endswith("gone.jpg")
    assert failures[1]["reason"].startswith("unreadable image")
    assert failures[2]["reason"] == "empty caption"
    assert json.loads(local["sizes.json"]) == {"00000.tar": 7, "00001.tar": 7, "00002.tar": 8, "00003.tar": 5}


def test_synthetic_on_ray_writes_the_local_bytes(tmp_path, ray_cluster):
    argv = ["prep", "synthetic", "--num-train", "40", "--num-val", "16", "--shard-size", "16", "--shifts", "none",
            "--num-binding", "0", "--num-labelled", "0", "--image-size", "32", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "local"), "--workers", "1"]) == 0
    assert main([*argv, "--out", str(tmp_path / "ray"), "--engine", "ray"]) == 0
    local = _dataset_files(tmp_path / "local")
    assert sorted(name for name in local if name.endswith(".tar")) == [
        "heldout/00000.tar", "train/00000.tar", "train/00001.tar", "train/00002.tar", "val/00000.tar"]
    assert _dataset_files(tmp_path / "ray") == local


def test_resume_on_ray_rewrites_only_the_missing_shard(tmp_path, table, ray_cluster, capsys):
    out = tmp_path / "ray"
    assert _prep_csv(table, out, "--engine", "ray", "--quiet") == 0
    finished = _dataset_files(out)
    (out / "00002.tar").unlink()  # killed while shard 2 was being written
    (out / "00002_stats.json").unlink()
    (out / "00002.tar.tmp").write_bytes(b"half a tar")
    kept = {name: ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns)
            for name in finished if name.startswith(("00000", "00001", "00003"))}
    capsys.readouterr()
    assert _prep_csv(table, out, "--engine", "ray", "--resume") == 0
    assert "prep csv: 1 shard(s) written by Ray tasks" in capsys.readouterr().err
    assert _dataset_files(out) == finished
    assert {name: ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) for name in kept} == kept


def test_ray_ignores_workers(tmp_path, table, ray_cluster):
    assert _prep_csv(table, tmp_path / "local", "--workers", "1", "--quiet") == 0
    assert _prep_csv(table, tmp_path / "ray", "--engine", "ray", "--workers", "3", "--quiet") == 0
    assert _dataset_files(tmp_path / "ray") == _dataset_files(tmp_path / "local")


class _DiesOnce:
    """A renderer whose worker process dies (os._exit, like a killed node) on row `row`, once."""

    def __init__(self, renderer, row: int, marker: str):
        self.renderer, self.row, self.marker = renderer, row, marker

    def __call__(self, index, row):
        if index == self.row and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return self.renderer(index, row)


def test_a_killed_task_is_retried_to_the_same_bytes(tmp_path, ray_cluster):
    from ray import cloudpickle  # the pickler Ray ships tasks and objects with

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    try:
        kwargs = dict(source={"kind": "synthetic", "split": "train", "seed": 0, "num_samples": 40}, image_size=32,
                      shard_size=16, quiet=True)
        renderer = SceneRenderer("train", 0, 32)
        pipeline.write_dataset(tmp_path / "local", list(range(40)), renderer, workers=1, **kwargs)
        dies = _DiesOnce(renderer, 20, str(tmp_path / "killed"))
        manifest = pipeline.write_dataset(tmp_path / "ray", list(range(40)), dies, engine="ray", **kwargs)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert (tmp_path / "killed").exists()  # the worker of shard 1 did die once
    assert (manifest["num_samples"], manifest["num_failures"]) == (40, 0)
    assert _dataset_files(tmp_path / "ray") == _dataset_files(tmp_path / "local")


def test_ray_engine_without_ray_is_one_line(tmp_path, table, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert _prep_csv(table, tmp_path / "out", "--engine", "ray", "--quiet") == 2
    err = capsys.readouterr().err
    assert "--engine ray needs Ray: pip install" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
