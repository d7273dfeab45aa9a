"""`mmssl prep` on strange rows and a failing disk: every row is accounted for, output errors stop
the run with one line and lose nothing, a changed input is never resumed into, and the json's
`key` is always the sample's real key."""
import hashlib
import io
import json
import os
import resource
import signal
import subprocess
import sys
import tarfile
import threading

import numpy as np
import pytest
from PIL import Image

from data_prep import coco, csv_source, folder, pipeline, shards
from data_prep.samples import Sample
from helpers import exit_code
from image_bytes import png_header
from mmssl.cli import main

MAX_CAPTION_BYTES = 64 * 1024  # the documented caption limit


def _save(path, pixels, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def _noise(width, height, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _failures(out):
    return [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]


def _members(out):
    """{tar member name: bytes} over every shard of a dataset folder."""
    members = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members.update((m.name, tar.extractfile(m).read()) for m in tar.getmembers())
    return members


def _dataset_files(folder_path):
    return {p.name: p.read_bytes() for p in sorted(folder_path.iterdir())}


def _counts(manifest):
    return manifest["num_rows"], manifest["num_samples"], manifest["num_failures"]


# ---- every row accounted for -------------------------------------------------------------------

def test_keep_ratio_sliver_is_one_failure_and_the_run_completes(tmp_path):
    _save(tmp_path / "ok.jpg", _noise(30, 24))
    _save(tmp_path / "sliver.png", _noise(2, 600))  # keep_ratio at 256 would make 256x76800
    _save(tmp_path / "ok2.png", _noise(20, 40, seed=1))
    (tmp_path / "t.csv").write_text("image,caption\nok.jpg,one\nsliver.png,thin\nok2.png,two\n")
    kwargs = dict(image_size=256, resize_mode="keep_ratio", shard_size=2, workers=1, quiet=True)
    manifest = csv_source.prepare(tmp_path / "t.csv", tmp_path / "out", **kwargs)
    assert _counts(manifest) == (3, 2, 1)
    (failure,) = _failures(tmp_path / "out")
    assert failure["row"] == 1
    assert failure["reason"] == ("output too large: keep_ratio at 256 px makes 256x76800, "
                                 "over JPEG's 65500-pixel side limit")
    members = _members(tmp_path / "out")
    assert Image.open(io.BytesIO(members["000000000.jpg"])).size == (320, 256)
    assert Image.open(io.BytesIO(members["000010000.jpg"])).size == (256, 512)
    again = csv_source.prepare(tmp_path / "t.csv", tmp_path / "out", resume=True, **kwargs)
    assert _counts(again) == (3, 2, 1)


def test_pixel_bombs_are_failures_not_warnings(tmp_path, recwarn):
    (tmp_path / "bomb.png").write_bytes(png_header(30000, 30000))     # PIL itself would raise
    (tmp_path / "warned.png").write_bytes(png_header(10000, 10000))   # PIL itself would only warn
    _save(tmp_path / "ok.png", _noise(20, 20), fmt="PNG")
    assert (tmp_path / "bomb.png").stat().st_size < 100
    (tmp_path / "t.csv").write_text("image,caption\nbomb.png,big\nwarned.png,less big\nok.png,fine\n")
    manifest = csv_source.prepare(tmp_path / "t.csv", tmp_path / "out", image_size=16, workers=1, quiet=True)
    assert _counts(manifest) == (3, 1, 2)
    assert [f["reason"] for f in _failures(tmp_path / "out")] == [
        "image too large: 30000x30000 = 900000000 pixels, over the limit of 89478485 (--max-image-pixels)",
        "image too large: 10000x10000 = 100000000 pixels, over the limit of 89478485 (--max-image-pixels)",
    ]
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_max_image_pixels_is_a_flag_and_bounds_the_output_too(tmp_path, capsys):
    _save(tmp_path / "a.png", _noise(40, 30), fmt="PNG")   # 1200 pixels
    _save(tmp_path / "b.png", _noise(20, 20), fmt="PNG")   # 400 pixels
    (tmp_path / "t.csv").write_text("image,caption\na.png,wide\nb.png,small\n")
    base = ["prep", "csv", "--input", str(tmp_path / "t.csv"), "--workers", "1", "--quiet"]
    assert main(base + ["--out", str(tmp_path / "o1"), "--image-size", "16", "--max-image-pixels", "1000"]) == 0
    assert "2 rows in, 1 written, 1 failed" in capsys.readouterr().out
    assert [f["reason"] for f in _failures(tmp_path / "o1")] == [
        "image too large: 40x30 = 1200 pixels, over the limit of 1000 (--max-image-pixels)"]
    # the resized image is bounded by the same limit: border at 40 px is 1600 pixels
    assert main(base + ["--out", str(tmp_path / "o2"), "--image-size", "40", "--max-image-pixels", "1500"]) == 0
    assert [f["reason"] for f in _failures(tmp_path / "o2")] == [
        "output too large: border at 40 px makes 40x40 = 1600 pixels, over the limit of 1500 (--max-image-pixels)"] * 2
    assert exit_code(base + ["--out", str(tmp_path / "o3"), "--max-image-pixels", "0"]) == 2
    assert "expected a number >= 1" in capsys.readouterr().err


def test_any_exception_of_a_row_becomes_its_reason(tmp_path):
    _save(tmp_path / "ok.jpg", _noise(30, 24))
    lines = [json.dumps({"image": "ok.jpg", "caption": "fine"}),
             json.dumps({"image": "bad\u0000name.jpg", "caption": "a NUL in the path"}),  # ValueError in open
             json.dumps({"image": "ok.jpg", "caption": "fine again"})]
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    manifest = csv_source.prepare(tmp_path / "t.jsonl", tmp_path / "out", image_size=16, workers=1, quiet=True)
    assert _counts(manifest) == (3, 2, 1)
    assert [(f["row"], f["reason"]) for f in _failures(tmp_path / "out")] == [(1, "ValueError: embedded null byte")]


class _Flaky:
    """A processor with a bug on every third row; its message holds a memory address."""

    def __call__(self, index, row):
        if index % 3 == 1:
            raise RuntimeError(f"cannot handle {object()}")
        return Sample(b"\xff\xd8 jpeg", f"row {index}", {"n": index})


@pytest.mark.parametrize("workers", [1, 2])
def test_unexpected_errors_are_reproducible_reasons_with_any_worker_count(tmp_path, workers):
    manifest = pipeline.write_dataset(tmp_path / "out", list(range(10)), _Flaky(), source={"kind": "test"},
                                      image_size=8, shard_size=4, workers=workers, quiet=True)
    assert _counts(manifest) == (10, 7, 3)
    assert [(f["row"], f["reason"]) for f in _failures(tmp_path / "out")] == [
        (1, "RuntimeError: cannot handle <object object>"), (4, "RuntimeError: cannot handle <object object>"),
        (7, "RuntimeError: cannot handle <object object>")]


class _DiesOnRow:
    """A processor whose worker process is killed on one row (an OOM kill, a segfault in a decoder)."""

    def __init__(self, row):
        self.row = row

    def __call__(self, index, row):
        if index == self.row:
            os.kill(os.getpid(), signal.SIGKILL)
        return Sample(b"\xff\xd8 jpeg", f"row {index}", {"n": index})


def test_a_dead_worker_stops_the_run_with_one_line_and_resume_finishes(tmp_path):
    out = tmp_path / "out"
    # 300 rows in shards of 64: the kill on row 250 comes after earlier shards are written
    with pytest.raises(pipeline.UserError, match="a prep worker process died .* rerun with --resume"):
        pipeline.write_dataset(out, list(range(300)), _DiesOnRow(250), source={"kind": "test"}, image_size=8,
                               shard_size=64, workers=2, quiet=True)
    assert not list(out.glob("*.tmp"))
    pipeline.write_dataset(out, list(range(300)), _DiesOnRow(-1), source={"kind": "test"}, image_size=8,
                           shard_size=64, workers=2, resume=True, quiet=True)
    clean = tmp_path / "clean"
    pipeline.write_dataset(clean, list(range(300)), _DiesOnRow(-1), source={"kind": "test"}, image_size=8,
                           shard_size=64, workers=1, quiet=True)
    assert _dataset_files(out) == _dataset_files(clean)


def test_unreadable_and_oversized_caption_files_are_failures(tmp_path):
    root = tmp_path / "in"
    for name in ("a", "b", "c", "d"):
        _save(root / f"{name}.png", _noise(20, 20), fmt="PNG")
    (root / "a.txt").write_text("a fine caption")
    # chmod 000 would not stop root; a folder where the caption file should be fails as root too
    (root / "b.txt").mkdir()
    (root / "c.txt").write_text("x" * (MAX_CAPTION_BYTES + 1))
    (root / "d.txt").write_text("another fine caption")
    manifest = folder.prepare(root, tmp_path / "out", image_size=16, workers=1, quiet=True)
    assert _counts(manifest) == (4, 2, 2)
    assert [(f["input"]["image"], f["reason"]) for f in _failures(tmp_path / "out")] == [
        ("b.png", "unreadable caption file b.txt: Is a directory"),
        ("c.png", f"caption too long: over the limit of {MAX_CAPTION_BYTES} bytes")]


def test_a_fifo_or_device_as_image_is_a_failure_not_a_hang(tmp_path):
    _save(tmp_path / "ok.jpg", _noise(30, 24))
    os.mkfifo(tmp_path / "pipe.jpg")
    # safety net for code that blocks on the FIFO: a writer opens it after a while, so such code
    # gets an empty read instead of hanging the test
    unblock = threading.Timer(5.0, lambda: os.close(os.open(tmp_path / "pipe.jpg", os.O_WRONLY)))
    unblock.daemon = True
    unblock.start()
    try:
        (tmp_path / "t.csv").write_text(f"image,caption\n{tmp_path}/pipe.jpg,a fifo\n/dev/null,a device\n"
                                        f"{tmp_path}/ok.jpg,fine\n")
        # --image-root / lets the table name any file: the device is then refused as not a regular file
        manifest = csv_source.prepare(tmp_path / "t.csv", tmp_path / "out", image_root="/", image_size=16,
                                      workers=1, quiet=True)
    finally:
        unblock.cancel()
    assert _counts(manifest) == (3, 1, 2)
    assert [f["reason"] for f in _failures(tmp_path / "out")] == [
        f"not a regular file: {tmp_path / 'pipe.jpg'}", "not a regular file: /dev/null"]
    outside = csv_source.prepare(tmp_path / "t.csv", tmp_path / "out2", image_size=16, workers=1, quiet=True)
    assert _counts(outside) == (3, 1, 2)
    assert _failures(tmp_path / "out2")[1]["reason"] == f"outside --image-root {tmp_path}: /dev/null"


def test_too_long_caption_in_a_table_is_a_failure(tmp_path):
    _save(tmp_path / "ok.jpg", _noise(30, 24))
    (tmp_path / "t.csv").write_text(f"image,caption\nok.jpg,{'y' * (MAX_CAPTION_BYTES + 1)}\nok.jpg,short\n")
    manifest = csv_source.prepare(tmp_path / "t.csv", tmp_path / "out", image_size=16, workers=1, quiet=True)
    assert _counts(manifest) == (2, 1, 1)
    assert _failures(tmp_path / "out")[0]["reason"] == f"caption too long: over the limit of {MAX_CAPTION_BYTES} bytes"


# ---- output errors stop the run with one line and lose nothing ----------------------------------

def _disk_full_inputs(tmp_path):
    """15 rows in shards of 5: two shards of flat images (small tars), then one of noise (a big tar)."""
    lines = ["image,caption"]
    for i in range(15):
        pixels = _noise(64, 64, seed=i) if i >= 10 else np.full((64, 64, 3), 10 * i, dtype=np.uint8)
        _save(tmp_path / "img" / f"{i}.png", pixels, fmt="PNG")
        lines.append(f"img/{i}.png,picture {i}")
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "t.csv"


def _limit_file_size(limit):
    def limit_in_child():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return limit_in_child


def test_file_too_large_during_shard_write_is_one_line_and_resume_finishes(tmp_path):
    table = _disk_full_inputs(tmp_path)
    csv_source.prepare(table, tmp_path / "clean", image_size=64, shard_size=5, workers=1, quiet=True)
    clean = _dataset_files(tmp_path / "clean")
    small, big = max(len(clean["00000.tar"]), len(clean["00001.tar"])), len(clean["00002.tar"])
    assert big > 2 * small and len(clean["manifest.json"]) < small
    out = tmp_path / "out"
    argv = ["prep", "csv", "--input", str(table), "--out", str(out), "--image-size", "64", "--shard-size", "5",
            "--workers", "1", "--quiet"]
    proc = subprocess.run([sys.executable, "-m", "mmssl", *argv], capture_output=True, text=True,
                          preexec_fn=_limit_file_size((small + big) // 2), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"mmssl: error: cannot write {out / '00002.tar'}: File too large\n"
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json"]
    for name in sorted(p.name for p in out.iterdir()):  # everything finished before is whole
        assert (out / name).read_bytes() == clean[name], name
    assert main(argv + ["--resume"]) == 0
    assert _dataset_files(out) == clean


def test_unwritable_output_folder_is_one_line(tmp_path, capsys):
    _save(tmp_path / "ok.jpg", _noise(30, 24))
    (tmp_path / "t.csv").write_text("image,caption\nok.jpg,fine\n")
    (tmp_path / "a_file").write_text("not a folder")
    assert main(["prep", "csv", "--input", str(tmp_path / "t.csv"), "--out", str(tmp_path / "a_file" / "out"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == f"mmssl: error: cannot create output folder {tmp_path / 'a_file' / 'out'}: Not a directory\n"


def test_shards_are_fsynced_before_their_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    shards.write_shard(tmp_path, 0, [shards.sample_members("000000000", Sample(b"jpg", "txt", {}))], {"shard": 0})
    tar, stats = tmp_path / "00000.tar", tmp_path / "00000_stats.json"
    assert events == [
        ("fsync", f"{tar}.tmp"), ("rename", f"{tar}.tmp", str(tar)), ("fsync", str(tmp_path)),
        ("fsync", f"{stats}.tmp"), ("rename", f"{stats}.tmp", str(stats)), ("fsync", str(tmp_path)),
    ]


def test_resume_redoes_a_shard_whose_stats_file_is_corrupt(tmp_path):
    _save(tmp_path / "ok.jpg", _noise(30, 24))
    (tmp_path / "t.csv").write_text("image,caption\n" + "".join(f"ok.jpg,n {i}\n" for i in range(6)))
    kwargs = dict(image_size=16, shard_size=2, workers=1, quiet=True)
    csv_source.prepare(tmp_path / "t.csv", tmp_path / "out", **kwargs)
    expected = _dataset_files(tmp_path / "out")
    stats = tmp_path / "out" / "00001_stats.json"
    stats.write_bytes(stats.read_bytes()[:20])  # cut short (e.g. a crash on a filesystem without fsync)
    csv_source.prepare(tmp_path / "t.csv", tmp_path / "out", resume=True, **kwargs)
    assert _dataset_files(tmp_path / "out") == expected


# ---- the input's content hash guards --resume ---------------------------------------------------

def test_resume_against_an_edited_table_is_refused(tmp_path, capsys):
    _save(tmp_path / "ok.jpg", _noise(30, 24))
    table = tmp_path / "t.csv"
    table.write_text("image,caption\n" + "".join(f"ok.jpg,caption {i}\n" for i in range(6)))
    out = tmp_path / "out"
    argv = ["prep", "csv", "--input", str(table), "--out", str(out), "--image-size", "16", "--shard-size", "2",
            "--workers", "1", "--quiet"]
    assert main(argv) == 0
    digest = hashlib.sha256(table.read_bytes()).hexdigest()
    assert json.loads((out / "manifest.json").read_text())["input_sha256"] == digest
    assert json.loads((out / "00002_stats.json").read_text())["options"]["input_sha256"] == digest
    (out / "00002.tar").unlink()  # an interrupted run ...
    table.write_text(table.read_text().replace("caption 1", "caption X"))  # ... and an edited input, same rows
    capsys.readouterr()
    assert main(argv + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert err == (f"mmssl: error: cannot resume {out}: the input changed since shard 00000.tar was written "
                   "(its content hash differs); use --overwrite to start again\n")
    assert not (out / "00002.tar").exists()


def test_folder_input_hash_follows_sizes_and_mtimes(tmp_path, capsys):
    root = tmp_path / "in"
    for name in ("a", "b", "c"):
        _save(root / f"{name}.png", _noise(20, 20), fmt="PNG")
        (root / f"{name}.txt").write_text(f"caption {name}")
    out = tmp_path / "out"
    first = folder.prepare(root, out, image_size=16, shard_size=1, workers=1, quiet=True)
    lines = "".join(f"{rel}\0{(root / rel).stat().st_size}\0{(root / rel).stat().st_mtime_ns}\n"
                    for rel in ("a.png", "a.txt", "b.png", "b.txt", "c.png", "c.txt"))
    assert first["input_sha256"] == hashlib.sha256(lines.encode()).hexdigest()
    assert folder.prepare(root, out, image_size=16, shard_size=1, workers=1, resume=True, quiet=True) == first
    (root / "b.txt").write_text("caption B")  # same size, new mtime
    os.utime(root / "b.txt", ns=(0, (root / "a.txt").stat().st_mtime_ns + 10**9))
    assert exit_code(["prep", "folder", "--input", str(root), "--out", str(out), "--image-size", "16",
                       "--shard-size", "1", "--workers", "1", "--quiet", "--resume"]) == 2
    assert "the input changed since shard 00000.tar was written" in capsys.readouterr().err


def test_coco_input_hash_is_the_captions_file(tmp_path, capsys):
    _save(tmp_path / "img" / "1.jpg", _noise(30, 24))
    captions = {"images": [{"id": 1, "file_name": "1.jpg"}], "annotations": [{"image_id": 1, "caption": "a cat"}]}
    (tmp_path / "c.json").write_text(json.dumps(captions))
    manifest = coco.prepare(tmp_path / "c.json", tmp_path / "img", tmp_path / "out", image_size=16, quiet=True)
    assert manifest["input_sha256"] == hashlib.sha256((tmp_path / "c.json").read_bytes()).hexdigest()
    captions["annotations"][0]["caption"] = "a dog"
    (tmp_path / "c.json").write_text(json.dumps(captions))
    assert main(["prep", "coco", "--captions", str(tmp_path / "c.json"), "--images", str(tmp_path / "img"),
                 "--out", str(tmp_path / "out"), "--image-size", "16", "--quiet", "--resume"]) == 2
    assert "the input changed since shard 00000.tar was written" in capsys.readouterr().err


# ---- reserved fields ------------------------------------------------------------------------------

def test_a_key_column_never_replaces_the_sample_key(tmp_path):
    _save(tmp_path / "ok.jpg", _noise(30, 24))
    rows = [{"image": "ok.jpg", "caption": "one", "key": "user-7", "width": 999, "source_width": "taken", "id": 1},
            {"image": "ok.jpg", "caption": "two", "key": "user-8", "original_height": -1}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    csv_source.prepare(tmp_path / "t.jsonl", tmp_path / "out", image_size=16, workers=1, quiet=True)
    members = _members(tmp_path / "out")
    first, second = json.loads(members["000000000.json"]), json.loads(members["000000001.json"])
    assert first == {"key": "000000000", "source_key": "user-7", "image": "ok.jpg", "caption": "one", "id": 1,
                     "width": 16, "height": 16, "original_width": 30, "original_height": 24,
                     "source_width": "taken", "source_source_width": 999}
    assert second["key"] == "000000001" and second["source_key"] == "user-8"
    assert (second["original_height"], second["source_original_height"]) == (24, -1)


def test_coco_image_fields_the_pipeline_writes_are_kept_under_source_names(tmp_path):
    _save(tmp_path / "img" / "1.jpg", _noise(30, 24))
    captions = {"images": [{"id": 1, "file_name": "1.jpg", "width": 30, "height": 24, "captions": ["own field"]}],
                "annotations": [{"image_id": 1, "caption": "a cat"}]}
    (tmp_path / "c.json").write_text(json.dumps(captions))
    coco.prepare(tmp_path / "c.json", tmp_path / "img", tmp_path / "out", image_size=16, quiet=True)
    meta = json.loads(_members(tmp_path / "out")["000000000.json"])
    assert meta["captions"] == ["a cat"] and meta["source_captions"] == ["own field"]
    assert (meta["width"], meta["height"], meta["source_width"], meta["source_height"]) == (16, 16, 30, 24)


def test_rows_cannot_name_files_outside_their_root(tmp_path):
    """A downloaded table, COCO file or folder must not copy files from elsewhere into a dataset."""
    secret = _save(tmp_path / "private" / "me.jpg", _noise(20, 20))
    root = tmp_path / "data"
    _save(root / "ok.jpg", _noise(20, 20, seed=1))
    (root / "link.jpg").symlink_to(secret)
    rows = [{"image": "ok.jpg", "caption": "fine"}, {"image": "../private/me.jpg", "caption": "dot-dot"},
            {"image": str(secret), "caption": "absolute"}, {"image": "link.jpg", "caption": "symlink"}]
    (root / "t.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    manifest = csv_source.prepare(root / "t.jsonl", tmp_path / "out", image_size=16, quiet=True)
    assert _counts(manifest) == (4, 1, 3)
    assert [f["reason"].split(":")[0] for f in _failures(tmp_path / "out")] == [f"outside --image-root {root}"] * 3

    (root / "link.txt").write_text("a caption")
    (root / "ok.txt").write_text("another caption")
    manifest = folder.prepare(root, tmp_path / "folder_out", image_size=16, quiet=True)
    assert _counts(manifest) == (2, 1, 1)
    assert _failures(tmp_path / "folder_out")[0]["reason"] == f"outside --input {root}: link.jpg"
