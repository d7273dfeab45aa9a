"""`mmssl prep synthetic`'s binding/ split: two-object scenes, the true caption and its attribute swaps."""
import io
import json
import re
import tarfile

import pytest
from PIL import Image

from data_prep import synthetic
from helpers import exit_code

SIZES = dict(num_train=2, num_val=8, num_heldout=2, num_binding=30, image_size=64, shard_size=12)
KINDS = ["colour_swap", "shape_swap", "position_swap"]
PLACES = {"horizontal": ("left", "right"), "vertical": ("top", "bottom")}
CAPTION = re.compile(r"an? (\w+) (\w+) (on the left|at the top) and an? (\w+) (\w+) (on the right|at the bottom)")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("binding_world")
    synthetic.generate(out, seed=7, workers=1, quiet=True, **SIZES)
    return out


def _samples(split_dir):
    """[(key, caption, meta, jpg bytes)] in shard order."""
    found = []
    for tar_path in sorted(split_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {}
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
        found += [(key, m["txt"].decode(), json.loads(m["json"]), m["jpg"]) for key, m in members.items()]
    return found


def _scene(caption):
    """'a red circle on the left and a blue square on the right' -> (('red', 'circle'), ('blue', 'square'))
    in reading order: first place (left / top), second place (right / bottom)."""
    match = CAPTION.fullmatch(caption)
    assert match, caption
    return (match[1], match[2]), (match[4], match[5])


def test_manifest_counts_shards_and_files_beside(world):
    manifest = json.loads((world / "binding" / "manifest.json").read_text())
    assert manifest["num_samples"] == 30 and manifest["num_failures"] == 0
    assert [s["count"] for s in manifest["shards"]] == [12, 12, 6]
    assert manifest["source"] == {"kind": "synthetic", "split": "binding", "seed": 7, "num_samples": 30}
    assert manifest["negative_kinds"] == KINDS
    assert len(_samples(world / "binding")) == 30
    assert len((world / "binding" / "classnames.txt").read_text().splitlines()) == 48
    assert (world / "binding" / "templates.txt").read_text() == (world / "val" / "templates.txt").read_text()


def test_scenes_are_two_seen_objects_of_different_colours_and_shapes(world):
    seen = set(synthetic.seen_pairs())
    layouts = set()
    for _, _, meta, jpg in _samples(world / "binding"):
        first, second = meta["objects"]
        assert first["colour"] != second["colour"] and first["shape"] != second["shape"]
        assert {(first["colour"], first["shape"]), (second["colour"], second["shape"])} <= seen
        assert (first["position"], second["position"]) == PLACES[meta["layout"]]
        axis = "x" if meta["layout"] == "horizontal" else "y"
        assert first[axis] < 32 < second[axis]          # each object in its own half of the 64 px image
        layouts.add(meta["layout"])
        image = Image.open(io.BytesIO(jpg)).convert("RGB")
        for obj in (first, second):  # the pixel at each centre shows that object's colour
            pixel = image.getpixel((int(obj["x"]), int(obj["y"])))
            assert max(abs(a - b) for a, b in zip(pixel, synthetic.COLOURS[obj["colour"]])) < 45, (obj, pixel)
    assert layouts == {"horizontal", "vertical"}


def test_true_caption_and_each_negative_kind_against_the_objects(world):
    for _, txt, meta, _ in _samples(world / "binding"):
        first, second = meta["objects"]
        a, b = (first["colour"], first["shape"]), (second["colour"], second["shape"])
        assert len(meta["captions"]) == 1          # retrieval on binding/ sees only the true caption
        captions = [*meta["captions"], *meta["negatives"]]
        assert meta["negative_kinds"] == KINDS and len(captions) == 4
        assert txt == captions[0]
        places = PLACES[meta["layout"]]
        assert (" on the left " in txt) == (places[0] == "left") and (" at the top " in txt) == (places[0] == "top")
        assert _scene(captions[0]) == (a, b)
        expected = {
            "colour_swap": ((b[0], a[1]), (a[0], b[1])),
            "shape_swap": ((a[0], b[1]), (b[0], a[1])),
            "position_swap": (b, a),
        }
        for kind, negative in zip(meta["negative_kinds"], captions[1:]):
            assert _scene(negative) == expected[kind], (kind, negative)
            assert negative != captions[0]
            assert _scene(negative) != (a, b)  # describes a scene that is not this image
            # the same template: only the attributes moved
            assert re.sub(r"an? \w+ \w+", "X", negative) == re.sub(r"an? \w+ \w+", "X", captions[0])
        assert len(set(captions)) == 4
        for caption in captions:  # articles follow the colour: "an orange ..."
            assert not re.search(r"\ba [aeiou]", caption) and not re.search(r"\ban [^aeiou]", caption)


def test_same_seed_same_bytes_other_seed_differs(world, tmp_path):
    synthetic.generate(tmp_path / "again", seed=7, workers=2, quiet=True, **SIZES)
    tars = sorted((world / "binding").glob("*.tar"))
    assert len(tars) == 3
    for tar in tars:
        assert (tmp_path / "again" / "binding" / tar.name).read_bytes() == tar.read_bytes()
    assert (tmp_path / "again" / "binding" / "manifest.json").read_text() == \
        (world / "binding" / "manifest.json").read_text()
    synthetic.generate(tmp_path / "other", seed=8, workers=1, quiet=True, **SIZES)
    assert (tmp_path / "other" / "binding" / "00000.tar").read_bytes() != tars[0].read_bytes()


def test_binding_split_leaves_the_other_splits_as_they_were(world, tmp_path):
    synthetic.generate(tmp_path / "none", seed=7, workers=1, quiet=True, **{**SIZES, "num_binding": 0})
    assert not (tmp_path / "none" / "binding").exists()
    for split in ("train", "val", "heldout"):
        assert (tmp_path / "none" / split / "00000.tar").read_bytes() == (world / split / "00000.tar").read_bytes()


def test_cli_default_count_zero_and_negative(tmp_path, capsys):
    base = ["prep", "synthetic", "--num-train", "1", "--num-val", "12", "--workers", "1", "--quiet"]
    assert exit_code(base + ["--out", str(tmp_path / "default")]) == 0
    assert "prep synthetic binding: 3 rows in, 3 written" in capsys.readouterr().out  # num-val / 4
    assert json.loads((tmp_path / "default" / "binding" / "manifest.json").read_text())["num_samples"] == 3
    assert exit_code(base + ["--out", str(tmp_path / "off"), "--num-binding", "0"]) == 0
    assert not (tmp_path / "off" / "binding").exists() and (tmp_path / "off" / "heldout").is_dir()
    assert exit_code(base + ["--out", str(tmp_path / "bad"), "--num-binding", "-1"]) == 2
    assert "--num-binding" in capsys.readouterr().err
