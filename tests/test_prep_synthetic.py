"""`mmssl prep synthetic`: layout, labels, held-out compositions, determinism, loadability."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_prep import cli as prep_cli
from data_prep import synthetic
from helpers import exit_code
from mmssl.cli import main
from mmssl.errors import UserError

SIZES = dict(num_train=300, num_val=96, num_heldout=30, image_size=64, shard_size=100)
SHIFT_SPLITS = ("shift_noise", "shift_blur", "shift_background")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    synthetic.generate(out, seed=3, workers=1, quiet=True, **SIZES)
    return out


def _tar_samples(path):
    """{key: {ext: bytes}} in member order, the way webdataset groups a tar."""
    samples = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def _all_json(split_dir):
    return [json.loads(s["json"]) for tar in sorted(split_dir.glob("*.tar")) for s in _tar_samples(tar).values()]


def test_layout_and_manifests(world):
    for split, count, shards in (("train", 300, 3), ("val", 96, 1), ("heldout", 30, 1)):
        manifest = json.loads((world / split / "manifest.json").read_text())
        assert manifest["num_samples"] == count and manifest["num_failures"] == 0
        assert manifest["image_size"] == 64
        assert [s["name"] for s in manifest["shards"]] == [f"{i:05d}.tar" for i in range(shards)]
        assert sum(s["count"] for s in manifest["shards"]) == count
        for i in range(shards):
            assert (world / split / f"{i:05d}_stats.json").is_file()
        assert (world / split / "failures.jsonl").read_text() == ""
        assert json.loads((world / split / "sizes.json").read_text()) == {s["name"]: s["count"] for s in manifest["shards"]}
        names = (world / split / "classnames.txt").read_text().splitlines()
        assert len(names) == 48 and names[0] == "red circle" and names[6] == "green circle"
        templates = (world / split / "templates.txt").read_text().splitlines()
        assert len(templates) >= 5 and all("{}" in t for t in templates)


def test_labels_match_classnames_and_heldout_pairs_never_in_train(world):
    names = synthetic.classnames()
    heldout = {f"{c} {s}" for c, s in synthetic.HELDOUT_PAIRS}
    assert len(heldout) == 6
    assert len({c for c, _ in synthetic.HELDOUT_PAIRS}) == 6 and len({s for _, s in synthetic.HELDOUT_PAIRS}) == 6
    train_pairs = {f"{o['colour']} {o['shape']}" for meta in _all_json(world / "train") for o in meta["objects"]}
    assert train_pairs.isdisjoint(heldout)
    assert len(train_pairs) == 42  # every seen pair occurs in 300 scenes
    for split, allowed in (("val", set(names) - heldout), ("heldout", heldout)):
        metas = _all_json(world / split)
        for meta in metas:
            assert names[meta["label"]] == meta["classname"] == f"{meta['colour']} {meta['shape']}"
            assert meta["label"] == synthetic.COLOURS_INDEX[meta["colour"]] * 6 + synthetic.SHAPES.index(meta["shape"])
            assert meta["size"] in ("small", "large") and meta["position"]
        assert {m["classname"] for m in metas} <= allowed
    assert {m["classname"] for m in _all_json(world / "heldout")} == heldout


def test_labelled_split_is_class_balanced_over_the_seen_pairs(world):
    names = synthetic.classnames()
    heldout = {f"{c} {s}" for c, s in synthetic.HELDOUT_PAIRS}
    metas = _all_json(world / "labelled")
    assert len(metas) == 96                                     # num_labelled defaults to num_val
    counts = {}
    for meta in metas:
        assert names[meta["label"]] == meta["classname"] == f"{meta['colour']} {meta['shape']}"
        counts[meta["classname"]] = counts.get(meta["classname"], 0) + 1
    assert set(counts) == set(names) - heldout                  # all 42 seen pairs, no heldout pair
    assert sorted(counts.values()) == [2] * 30 + [3] * 12       # 96 = 2 x 42 + 12: balanced
    val_images = {s["jpg"] for tar in (world / "val").glob("*.tar") for s in _tar_samples(tar).values()}
    labelled_images = {s["jpg"] for tar in (world / "labelled").glob("*.tar") for s in _tar_samples(tar).values()}
    assert val_images.isdisjoint(labelled_images)               # other scenes than the test set's


def test_num_labelled_zero_writes_none(tmp_path):
    synthetic.generate(tmp_path, num_train=10, num_val=4, num_labelled=0, shifts=(), quiet=True)
    assert not (tmp_path / "labelled").exists() and (tmp_path / "val").is_dir()


def test_captions_describe_the_scene(world):
    checked = 0
    for tar in sorted((world / "train").glob("*.tar")):
        for sample in _tar_samples(tar).values():
            caption, meta = sample["txt"].decode(), json.loads(sample["json"])
            assert len(meta["objects"]) in (1, 2)
            for obj in meta["objects"]:
                assert obj["colour"] in caption and obj["shape"] in caption
            checked += 1
    assert checked == 300  # every train sample: over no shards the loops above would pass


def test_same_seed_same_bytes_any_workers_and_other_seed_differs(world, tmp_path):
    synthetic.generate(tmp_path / "again", seed=3, workers=2, quiet=True, **SIZES)
    for split in ("train", "val", "heldout", *SHIFT_SPLITS):
        assert sorted((world / split).glob("*.tar"))
        for tar in sorted((world / split).glob("*.tar")):
            assert (tmp_path / "again" / split / tar.name).read_bytes() == tar.read_bytes()
        assert (tmp_path / "again" / split / "manifest.json").read_text() == (world / split / "manifest.json").read_text()
    synthetic.generate(tmp_path / "other", seed=4, workers=1, quiet=True, **{**SIZES, "num_train": 100})
    assert (tmp_path / "other" / "val" / "00000.tar").read_bytes() != (world / "val" / "00000.tar").read_bytes()


def test_loads_with_webdataset_and_open_clip_layout(world):
    urls = [str(p) for p in sorted((world / "train").glob("*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(samples) == 300
    assert isinstance(samples[0]["jpg"], Image.Image) and samples[0]["jpg"].size == (64, 64)
    assert samples[0]["__key__"] == "000000000" and samples[-1]["__key__"] == "000020099"
    # open_clip's training loader: dataset size from sizes.json beside the shards (looked up by
    # basename), samples grouped by key, kept when they have txt and an image, decoded to RGB
    pattern = str(world / "train" / "{00000..00002}.tar")
    expanded = wds.shardlists.expand_urls(pattern)
    sizes = json.loads((world / "train" / "sizes.json").read_text())
    assert sum(int(sizes[os.path.basename(url)]) for url in expanded) == 300
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(pattern), wds.tarfile_to_samples(),
        wds.select(lambda s: "txt" in s and any(k in s for k in ("png", "jpg", "jpeg", "webp"))),
        wds.decode("pilrgb"), wds.rename(image="jpg;png;jpeg;webp", text="txt"), wds.to_tuple("image", "text"),
    )
    pairs = list(pipeline)
    assert len(pairs) == 300 and pairs[0][0].mode == "RGB" and isinstance(pairs[0][1], str)
    # what open_clip's webdataset pipeline relies on: one key per sample (no dot in it), an image
    # under jpg and a caption under txt, members of a sample next to each other in the tar
    for url in urls:
        with tarfile.open(url) as tar:
            names = tar.getnames()
        keys = [n.split(".", 1)[0] for n in names]
        assert all(name.count(".") == 1 for name in names)
        assert keys == sorted(keys)
        assert all({f"{k}.jpg", f"{k}.txt", f"{k}.json"} <= set(names) for k in keys)


def test_images_show_the_object_colour(world):
    """The pixel at a single object's centre is its colour (noise background is dark)."""
    samples = list(_tar_samples(world / "val" / "00000.tar").values())[:20]
    assert len(samples) == 20
    for sample in samples:
        meta = json.loads(sample["json"])
        image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        pixel = image.getpixel((int(meta["x"]), int(meta["y"])))
        expected = synthetic.COLOURS[meta["colour"]]
        assert max(abs(a - b) for a, b in zip(pixel, expected)) < 45, (meta, pixel)


def test_cli_refuses_non_empty_output_then_resumes(world, tmp_path, capsys):
    args = ["prep", "synthetic", "--out", str(tmp_path), "--num-train", "20", "--num-val", "8", "--quiet",
            "--workers", "1", "--shard-size", "10"]
    assert main(args) == 0
    assert "prep synthetic train: 20 rows in, 20 written, 0 failed" in capsys.readouterr().out
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not empty" in err and "--resume" in err
    assert main(args + ["--resume"]) == 0
    assert main(args + ["--overwrite"]) == 0


def _images(split_dir):
    """{key: RGB pixels as int16} of every sample of a split."""
    return {key: np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"), dtype=np.int16)
            for tar in sorted(split_dir.glob("*.tar")) for key, s in _tar_samples(tar).items()}


def test_shift_splits_hold_vals_scenes_with_other_pixels(world):
    """Each shift_* split: val's keys, captions and json (labels included), its manifest labelled
    like val's; only the pixels change, by more than JPEG and far more than a rerun would."""
    val = {key: s for tar in sorted((world / "val").glob("*.tar")) for key, s in _tar_samples(tar).items()}
    val_manifest = json.loads((world / "val" / "manifest.json").read_text())
    val_images = _images(world / "val")
    assert len(val) == 96
    for split in SHIFT_SPLITS:
        samples = {key: s for tar in sorted((world / split).glob("*.tar")) for key, s in _tar_samples(tar).items()}
        assert list(samples) == list(val)
        for key, sample in samples.items():
            assert sample["txt"] == val[key]["txt"] and sample["json"] == val[key]["json"]
        manifest = json.loads((world / split / "manifest.json").read_text())
        assert manifest["num_samples"] == 96 and manifest["num_classes"] == 48 == val_manifest["num_classes"]
        assert manifest["heldout_pairs"] == val_manifest["heldout_pairs"] and manifest["shift_of"] == "val"
        assert manifest["source"]["split"] == split
        assert (world / split / "classnames.txt").read_text() == (world / "val" / "classnames.txt").read_text()
        images = _images(world / split)
        differences = [np.abs(images[key] - val_images[key]).mean() for key in val]
        assert min(differences) > SHIFT_MIN_DIFFERENCE[split], (split, min(differences))


# half the smallest per-image mean absolute pixel difference (0..255) to val measured over this
# world's 96 scenes: noise 33.5 (mean 36.6), blur 6.0 (7.4), background 16.8 (44.2); old code: no split
SHIFT_MIN_DIFFERENCE = {"shift_noise": 16, "shift_blur": 3, "shift_background": 8}


def test_shifted_objects_stay_recognisable(world):
    """The mean of a 5x5 patch at the object's centre stays near its colour: under the background
    shift and noise for every object, under blur for the large ones (a small star's centre is
    smeared). Worst measured: background 18, noise 48 (white is clipped at 255), blur 18."""
    val_json = [json.loads(s["json"]) for s in _tar_samples(world / "val" / "00000.tar").values()]
    for split, tolerance in (("shift_background", 45), ("shift_noise", 65), ("shift_blur", 45)):
        images = _images(world / split)
        assert len(images) == len(val_json) == 96
        for meta, pixels in zip(val_json, images.values()):
            if split == "shift_blur" and meta["size"] == "small":
                continue
            x, y = int(meta["x"]), int(meta["y"])
            patch = pixels[y - 2:y + 3, x - 2:x + 3].reshape(-1, 3).mean(axis=0)
            expected = synthetic.COLOURS[meta["colour"]]
            assert max(abs(a - b) for a, b in zip(patch, expected)) < tolerance, (split, meta, patch)


def test_shifts_option_leaves_val_alone_and_writes_only_the_named(world, tmp_path):
    synthetic.generate(tmp_path / "none", seed=3, workers=1, quiet=True, shifts=(), **SIZES)
    assert not [split for split in SHIFT_SPLITS if (tmp_path / "none" / split).exists()]
    for split in ("train", "val", "heldout"):  # the clean splits are the same bytes with or without shifts
        assert (tmp_path / "none" / split / "00000.tar").read_bytes() == (world / split / "00000.tar").read_bytes()
        assert (tmp_path / "none" / split / "manifest.json").read_text() == (world / split / "manifest.json").read_text()
    manifests = synthetic.generate(tmp_path / "blur", seed=3, workers=1, quiet=True, shifts=("blur",),
                                   **{**SIZES, "num_train": 10})
    assert [s for s in manifests if s.startswith("shift_")] == ["shift_blur"]
    assert (tmp_path / "blur" / "shift_blur" / "00000.tar").read_bytes() == (world / "shift_blur" / "00000.tar").read_bytes()
    # --resume of the run without shifts adds them, the same bytes as a run that had them from the start
    synthetic.generate(tmp_path / "none", seed=3, workers=1, quiet=True, resume=True, **SIZES)
    for split in SHIFT_SPLITS:
        for name in ("00000.tar", "manifest.json", "sizes.json", "classnames.txt", "templates.txt"):
            assert (tmp_path / "none" / split / name).read_bytes() == (world / split / name).read_bytes()
    with pytest.raises(UserError, match="unknown shift 'fog'"):
        synthetic.generate(tmp_path / "bad", shifts=("noise", "fog"), **SIZES)
    assert not (tmp_path / "bad").exists()  # refused before anything is written


def test_cli_shifts_option(tmp_path, capsys):
    assert prep_cli.SHIFT_NAMES.split(",") == list(synthetic.SHIFTS)  # the parser's copy of the names
    base = ["prep", "synthetic", "--num-train", "4", "--num-val", "8", "--workers", "1", "--quiet"]
    assert exit_code(base + ["--out", str(tmp_path / "default")]) == 0
    out = capsys.readouterr().out
    for split in SHIFT_SPLITS:
        assert f"prep synthetic {split}: 8 rows in, 8 written, 0 failed" in out
    assert exit_code(base + ["--out", str(tmp_path / "none"), "--shifts", "none"]) == 0
    assert exit_code(base + ["--out", str(tmp_path / "empty"), "--shifts", ""]) == 0
    for folder in ("none", "empty"):
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == ["binding", "heldout", "labelled", "train",
                                                                         "val"]
    assert exit_code(base + ["--out", str(tmp_path / "two"), "--shifts", "background, noise"]) == 0
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.name.startswith("shift_")) == [
        "shift_background", "shift_noise"]
    capsys.readouterr()
    assert exit_code(base + ["--out", str(tmp_path / "bad"), "--shifts", "noise,bogus"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--shifts" in err and "'bogus'" in err
    assert not (tmp_path / "bad").exists()
