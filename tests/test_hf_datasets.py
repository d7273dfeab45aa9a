"""Shards written by `mmssl prep` load with Hugging Face `datasets` as they are (the README's command)."""
import json
import tarfile

import pytest


def test_prep_shards_load_with_hugging_face_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")      # in the test extra; CI always has it
    from mmssl.cli import main

    assert main(["prep", "synthetic", "--out", str(tmp_path / "syn"), "--num-train", "30", "--num-val", "12",
                 "--num-heldout", "4", "--quiet"]) == 0
    folder = tmp_path / "syn" / "val"
    manifest = json.loads((folder / "manifest.json").read_text())
    shards = sorted(str(path) for path in folder.glob("*.tar"))
    expected = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for name in sorted(members):
            key, _, ext = name.partition(".")
            if ext == "txt":
                expected.append((key, members[name].decode(), json.loads(members[f"{key}.json"])))

    loaded = datasets.load_dataset("webdataset", data_files={"val": shards}, split="val",
                                   cache_dir=str(tmp_path / "hf_cache"))
    assert loaded.num_rows == manifest["num_samples"] == len(expected) == 12
    assert {"__key__", "jpg", "txt", "json"} <= set(loaded.column_names)
    rows = sorted(((row["__key__"], row["txt"], row["json"]) for row in loaded), key=lambda row: row[0])
    assert [(key, text, meta["label"], meta["classname"]) for key, text, meta in rows] == \
        [(key, text, meta["label"], meta["classname"]) for key, text, meta in sorted(expected)]
    image = loaded[0]["jpg"]
    assert image.size == (manifest["image_size"], manifest["image_size"]) and image.mode == "RGB"
