"""`prep csv|folder|coco` on generated fixtures: exact counts, failure reasons, sample contents."""
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from data_prep import coco, csv_source, folder
from helpers import exit_code
from image_bytes import png_header
from mmssl.cli import main


def _image(path, size=(48, 32), seed=0, fmt=None):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def _broken_images(root):
    """The ways an image file can be bad, next to two good images."""
    _image(root / "ok.jpg")
    _image(root / "ok2.png", size=(20, 40), seed=1)
    (root / "corrupt.jpg").write_bytes(b"this is not an image" * 10)
    good = (root / "ok.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "zero.png").write_bytes(png_header(0, 10))


def _samples(out):
    """{key: {"jpg": bytes, "txt": str, "json": dict}} over all shards of a dataset folder."""
    samples = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                samples.setdefault(key, {})[ext] = json.loads(data) if ext == "json" else (
                    data.decode() if ext == "txt" else data)
    return samples


def _failures(out):
    return [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]


CSV_ROWS = [  # (image, caption, score); row 6 is short: no caption column
    "image,caption,score",
    "ok.jpg,a red box,0.5",
    "missing.jpg,gone,0.1",
    "corrupt.jpg,corrupt,0.2",
    "truncated.jpg,cut short,0.3",
    "empty.jpg,zero bytes,0.4",
    'ok2.png,"   ",0.6',
    "ok2.png",
    "zero.png,zero width,0.65",
    "{abs},absolute path,0.7",
    "ok2.png,a tall one,0.8",
]


def test_csv_counts_failures_and_sample_contents(tmp_path, capsys):
    images = tmp_path / "images"
    _broken_images(images)
    table = tmp_path / "pairs.csv"
    table.write_text("\n".join(CSV_ROWS).replace("{abs}", str(images / "ok.jpg")) + "\n")
    out = tmp_path / "out"
    code = main(["prep", "csv", "--input", str(table), "--image-root", str(images), "--out", str(out),
                 "--image-size", "32", "--shard-size", "4", "--workers", "1", "--quiet"])
    assert code == 0
    assert "prep csv: 10 rows in, 3 written, 7 failed" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["num_rows"], manifest["num_samples"], manifest["num_failures"]) == (10, 3, 7)
    assert [(s["name"], s["count"], s["rows"]) for s in manifest["shards"]] == [
        ("00000.tar", 1, 4), ("00001.tar", 0, 4), ("00002.tar", 2, 2)]
    stats = json.loads((out / "00002_stats.json").read_text())  # img2dataset's fields and meaning
    assert (stats["count"], stats["successes"], stats["failed"]) == (2, 2, 0)
    failures = _failures(out)
    assert [f["row"] for f in failures] == [1, 2, 3, 4, 5, 6, 7]
    reasons = [f["reason"] for f in failures]
    assert reasons[0].startswith("missing file:") and reasons[0].endswith("missing.jpg")
    assert reasons[1].startswith("unreadable image")
    assert reasons[2].startswith("truncated image")
    assert reasons[3].startswith("empty file (0 bytes)")
    assert reasons[4] == "empty caption"
    assert reasons[5] == "missing column 'caption'"
    assert reasons[6].startswith("unreadable image")  # a zero-width image
    assert failures[0]["input"] == {"image": "missing.jpg", "caption": "gone", "score": "0.1"}

    samples = _samples(out)
    assert sorted(samples) == ["000000000", "000020000", "000020001"]  # key = shard + row in shard
    first = samples["000000000"]
    assert first["txt"] == "a red box"
    assert first["json"] == {"key": "000000000", "image": "ok.jpg", "caption": "a red box", "score": "0.5",
                             "original_width": 48, "original_height": 32, "width": 32, "height": 32}
    assert samples["000020000"]["txt"] == "absolute path"
    tall = Image.open(io.BytesIO(samples["000020001"]["jpg"]))
    assert tall.size == (32, 32)  # border: 20x40 -> 16x32, padded with black to a square
    assert max(tall.getpixel((1, 16))) < 12 and max(tall.getpixel((30, 16))) < 12
    assert len(list(wds.WebDataset(str(out / "{00000..00002}.tar"), shardshuffle=False).decode("pil"))) == 3


def test_jsonl_tsv_and_parquet_readers(tmp_path):
    images = tmp_path / "images"
    _broken_images(images)
    (tmp_path / "t.jsonl").write_text("\n".join([
        json.dumps({"image": "ok.jpg", "caption": "a red box", "tags": ["x", "y"]}),
        json.dumps({"image": "ok2.png", "caption": 123}),
        "{not json",
        json.dumps(["a", "list"]),
        "",
        json.dumps({"caption": "no image column"}),
    ]) + "\n")
    manifest = csv_source.prepare(tmp_path / "t.jsonl", tmp_path / "jsonl", image_root=images, image_size=16, quiet=True)
    assert (manifest["num_rows"], manifest["num_samples"], manifest["num_failures"]) == (5, 1, 4)
    assert [f["reason"] for f in _failures(tmp_path / "jsonl")] == [
        "caption is not text (int)", "invalid JSON line: Expecting property name enclosed in double quotes",
        "JSON line is not an object", "missing column 'image'"]
    assert _failures(tmp_path / "jsonl")[1]["input"]["line"] == "{not json"
    assert _samples(tmp_path / "jsonl")["000000000"]["json"]["tags"] == ["x", "y"]

    (tmp_path / "t.tsv").write_text("caption\timage\na red box\tok.jpg\ntruncated\ttruncated.jpg\n")
    manifest = csv_source.prepare(tmp_path / "t.tsv", tmp_path / "tsv", image_root=images, image_size=16, quiet=True)
    assert (manifest["num_samples"], manifest["num_failures"]) == (1, 1)

    pq.write_table(pa.table({"path": ["ok.jpg", "ok2.png", "ok.jpg"], "text": ["one", None, "three"],
                             "id": [7, 8, 9]}), tmp_path / "t.parquet")
    manifest = csv_source.prepare(tmp_path / "t.parquet", tmp_path / "parquet", image_root=images,
                                  image_col="path", caption_col="text", image_size=16, resize_mode="center_crop",
                                  quiet=True)
    assert (manifest["num_samples"], manifest["num_failures"]) == (2, 1)
    assert _failures(tmp_path / "parquet")[0]["reason"] == "missing caption"
    assert [s["json"]["id"] for s in _samples(tmp_path / "parquet").values()] == [7, 9]


def test_output_does_not_depend_on_workers(tmp_path):
    images = tmp_path / "images"
    lines = ["image,caption"]
    for i in range(23):
        _image(images / f"{i}.jpg", size=(40 + i, 30), seed=i)
        lines.append(f"{i}.jpg,picture {i}")
    lines.append("nothere.jpg,lost")
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    for workers in (1, 2):
        csv_source.prepare(tmp_path / "t.csv", tmp_path / f"w{workers}", image_size=24, shard_size=5,
                           workers=workers, quiet=True)
    names = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "w2").iterdir())
    assert len([n for n in names if n.endswith(".tar")]) == 5
    for name in names:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name


@pytest.mark.parametrize("args, message", [
    (["--caption-col", "text"], "--caption-col 'text' is not a column of"),
    (["--image-col", "path"], "--image-col 'path' is not a column of"),
    (["--input", "{tmp}/nope.csv"], "input file not found"),
    (["--input", "{tmp}/t.txt"], "cannot tell the format of"),
    (["--input", "{tmp}/latin1.csv"], "not UTF-8 text"),
    (["--input", "{tmp}/header_only.csv"], "the input is empty"),
    (["--resize-mode", "stretch"], "invalid choice: 'stretch'"),
    (["--quality", "0"], "expected a number >= 1"),
    (["--shard-size", "many"], "expected a whole number"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_csv_user_errors_exit_2_with_one_line(tmp_path, capsys, args, message):
    (tmp_path / "t.csv").write_text("image,caption\nok.jpg,hi\n")
    (tmp_path / "t.txt").write_text("image,caption\n")
    (tmp_path / "header_only.csv").write_text("image,caption\n")
    (tmp_path / "latin1.csv").write_bytes("image,caption\nok.jpg,caf\u00e9\n".encode("latin-1"))
    argv = ["prep", "csv", "--input", str(tmp_path / "t.csv"), "--out", str(tmp_path / "out"), "--quiet"]
    assert exit_code(argv + [a.replace("{tmp}", str(tmp_path)) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_folder_with_sidecar_captions(tmp_path):
    root = tmp_path / "in"
    _image(root / "a" / "1.jpg")
    (root / "a" / "1.txt").write_text("first caption\n")
    _image(root / "b.png", seed=2, fmt="PNG")
    (root / "b.txt").write_text("second")
    _image(root / "c.jpg", seed=3)  # no caption file
    _image(root / "d.jpg", seed=4)
    (root / "d.txt").write_text("  \n")
    _image(root / "e.webp", seed=5)
    (root / "e.txt").write_bytes(b"\xff\xfe\xfa")
    (root / "notes.md").write_text("not an image, not a row")
    manifest = folder.prepare(root, tmp_path / "out", image_size=16, quiet=True)
    assert manifest["layout"] == "captions"
    assert (manifest["num_rows"], manifest["num_samples"], manifest["num_failures"]) == (5, 2, 3)
    assert [(f["input"]["image"], f["reason"]) for f in _failures(tmp_path / "out")] == [
        ("c.jpg", "missing caption file c.txt"), ("d.jpg", "empty caption"),
        ("e.webp", "caption is not text (not UTF-8)")]
    assert [(s["txt"], s["json"]["image"]) for s in _samples(tmp_path / "out").values()] == [
        ("first caption", "a/1.jpg"), ("second", "b.png")]
    assert not (tmp_path / "out" / "classnames.txt").exists()


@pytest.mark.parametrize("layout", ["auto", "classes"])
def test_folder_with_class_subfolders(tmp_path, layout):
    root = tmp_path / "in"
    _image(root / "cat" / "1.jpg")
    _image(root / "cat" / "2.jpg", seed=1)
    _image(root / "dog" / "x.png", seed=2)
    _image(root / "dog" / "puppies" / "y.jpg", seed=3)
    (root / "sea_lion").mkdir()
    (root / "sea_lion" / "z.jpg").write_bytes(b"\x00" * 50)
    if layout == "classes":
        _image(root / "stray.jpg", seed=4)
    manifest = folder.prepare(root, tmp_path / "out", layout=layout, image_size=16, quiet=True)
    assert manifest["layout"] == "classes" and manifest["num_classes"] == 3
    assert (tmp_path / "out" / "classnames.txt").read_text().splitlines() == ["cat", "dog", "sea lion"]
    assert all("{}" in t for t in (tmp_path / "out" / "templates.txt").read_text().splitlines())
    samples = list(_samples(tmp_path / "out").values())
    assert [(s["json"]["label"], s["json"]["classname"], s["txt"]) for s in samples] == [
        (0, "cat", "cat"), (0, "cat", "cat"), (1, "dog", "dog"), (1, "dog", "dog")]
    reasons = [f["reason"] for f in _failures(tmp_path / "out")]
    assert reasons[0].startswith("unreadable image")
    assert reasons[1:] == (["image is not inside a class sub-folder"] if layout == "classes" else [])


def test_folder_of_plain_images_makes_shards_without_captions(tmp_path):
    """No .txt and no class folders (or --layout images): image-only shards, for loss.kind=simclr."""
    _image(tmp_path / "in" / "a.jpg")
    _image(tmp_path / "in" / "b.png", seed=1)
    _image(tmp_path / "classes" / "cat" / "c.jpg", seed=2)
    assert main(["prep", "folder", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "o")]) == 0
    assert main(["prep", "folder", "--input", str(tmp_path / "classes"), "--out", str(tmp_path / "forced"),
                 "--layout", "images"]) == 0
    for out, count in ((tmp_path / "o", 2), (tmp_path / "forced", 1)):
        samples = list(_samples(out).values())
        assert len(samples) == count and all(set(s) == {"jpg", "json"} for s in samples)
        assert json.loads((out / "manifest.json").read_text())["layout"] == "images"
        assert not (out / "classnames.txt").exists()


def test_coco_keeps_all_captions(tmp_path):
    images = tmp_path / "val2017"
    _image(images / "000001.jpg")
    _image(images / "000003.jpg", seed=1)
    captions = {
        "images": [{"id": 1, "file_name": "000001.jpg", "width": 48, "height": 32},
                   {"id": 2, "file_name": "000002.jpg"},
                   {"id": 3, "file_name": "000003.jpg"},
                   {"id": 4, "file_name": "000001.jpg"}],
        "annotations": [{"id": 10, "image_id": 1, "caption": "A man riding a horse. "},
                        {"id": 11, "image_id": 2, "caption": "lost with its image"},
                        {"id": 12, "image_id": 1, "caption": "   "},
                        {"id": 13, "image_id": 1, "caption": "Someone on a horse."},
                        {"id": 14, "image_id": 99, "caption": "no such image"},
                        {"id": 15, "image_id": 4, "caption": ""}],
    }
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    out = tmp_path / "out"
    assert main(["prep", "coco", "--captions", str(tmp_path / "captions.json"), "--images", str(images),
                 "--out", str(out), "--image-size", "16", "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["num_rows"], manifest["num_samples"], manifest["num_failures"]) == (4, 1, 3)
    assert manifest["unmatched_annotations"] == 1
    assert [(f["row"], f["reason"].split(":")[0]) for f in _failures(out)] == [
        (1, "missing file"), (2, "no caption annotations"), (3, "no non-empty caption")]
    (sample,) = _samples(out).values()
    assert sample["txt"] == "A man riding a horse."
    assert sample["json"]["captions"] == ["A man riding a horse.", "Someone on a horse."]
    assert sample["json"]["id"] == 1 and sample["json"]["width"] == 16


def test_coco_bad_json_is_a_user_error(tmp_path, capsys):
    (tmp_path / "c.json").write_text('{"images": []}')
    (tmp_path / "img").mkdir()
    assert main(["prep", "coco", "--captions", str(tmp_path / "c.json"), "--images", str(tmp_path / "img"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "needs 'images' and 'annotations' lists" in capsys.readouterr().err


def test_folder_classnames_file_gives_readable_names(tmp_path, capsys):
    root = tmp_path / "in"
    _image(root / "n01443537" / "a.jpg")
    _image(root / "n01491361" / "b.jpg", seed=1)
    (tmp_path / "names.txt").write_text("goldfish\ntiger shark\n")
    folder.prepare(root, tmp_path / "out", classnames_file=tmp_path / "names.txt", image_size=16, quiet=True)
    assert (tmp_path / "out" / "classnames.txt").read_text() == "goldfish\ntiger shark\n"
    assert [s["txt"] for s in _samples(tmp_path / "out").values()] == ["goldfish", "tiger shark"]
    (tmp_path / "short.txt").write_text("goldfish\n")
    assert main(["prep", "folder", "--input", str(root), "--out", str(tmp_path / "o2"),
                 "--classnames", str(tmp_path / "short.txt")]) == 2
    assert "has 1 names for 2 class folders" in capsys.readouterr().err
