"""`mmssl embed`: clip-retrieval's layout with nothing lost, the same bits on the local and Ray
engines, resume after deleted / corrupt parts and after a killed Ray worker, and
`mmssl index build --embeddings DIR` over the folder (hostile folders refused in one line)."""
import hashlib
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import write_micro_checkpoint
from mmssl.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
PARTS = [f"{i:05d}" for i in range(6)]      # 48 samples in shards of 8: one part per shard


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """(root, embed argv without --out, the local run's OUT): 6 shards embedded with a random micro model."""
    root = tmp_path_factory.mktemp("embed")
    checkpoint = write_micro_checkpoint(root / "ckpt" / "micro.pt")
    assert main(["prep", "synthetic", "--out", str(root / "syn"), "--num-train", "48", "--num-val", "8",
                 "--num-heldout", "4", "--shard-size", "8", "--quiet"]) == 0
    argv = ["embed", "--checkpoint", str(checkpoint), "--data", str(root / "syn" / "train"),
            "--modality", "image,text", "--precision", "fp32", "--workers", "0", "--batch-size", "5"]
    import torch

    torch.set_num_threads(2)   # unlike a Ray worker's 1: the same bits only because --threads pins it
    try:
        assert main([*argv, "--out", str(root / "local")]) == 0
    finally:
        torch.set_num_threads(1)
    return root, argv, root / "local"


def digests(out: Path) -> dict:
    """relative path -> SHA-256 of every layout file (records and embed_info excluded)."""
    return {str(path.relative_to(out)): hashlib.sha256(path.read_bytes()).hexdigest()
            for folder in ("img_emb", "text_emb", "metadata") for path in sorted((out / folder).iterdir())}


def info_without_timings(out: Path) -> dict:
    info = json.loads((out / "embed_info.json").read_text())
    info.pop("timings_s")
    return info


def test_local_layout_holds_every_sample_in_shard_order(job):
    from eval.embed import embed_images, embed_texts, load_model, open_eval_data
    from eval.index.shard_members import shard_members

    root, _, out = job
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == [f"img_emb_{p}.npy" for p in PARTS]
    assert sorted(p.name for p in (out / "text_emb").iterdir()) == [f"text_emb_{p}.npy" for p in PARTS]
    info = json.loads((out / "embed_info.json").read_text())
    assert (info["rows"], info["dim"], info["precision"], info["modalities"]) == (48, 32, "fp32", ["image", "text"])
    shards = sorted((root / "syn" / "train").glob("*.tar"))
    assert [part["shards"] for part in info["parts"]] == [[str(shard.resolve())] for shard in shards]
    images, texts, keys, captions = [], [], [], []
    for part, shard in zip(PARTS, shards):
        image = np.load(out / "img_emb" / f"img_emb_{part}.npy")
        text = np.load(out / "text_emb" / f"text_emb_{part}.npy")
        table = pq.read_table(out / "metadata" / f"metadata_{part}.parquet")
        assert image.dtype == text.dtype == np.float32 and image.shape == text.shape == (8, 32)
        np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1.0, atol=1e-5)
        members = shard_members(str(shard))
        assert table.column("key").to_pylist() == list(members)          # the tar's own order
        assert table.column("shard").to_pylist() == [str(shard.resolve())] * 8
        offsets = table.column("image_offset").to_pylist()
        assert offsets == [members[key]["image_offset"] for key in members] and None not in offsets
        assert [json.loads(value)["key"] for value in table.column("json").to_pylist()] == list(members)
        images.append(image), texts.append(text)
        keys += table.column("key").to_pylist()
        captions += table.column("caption").to_pylist()
    # the same vectors eval.embed computes over the whole data in one pass
    loaded = load_model(str(root / "ckpt" / "micro.pt"), "fp32")
    whole = embed_images(loaded, open_eval_data(str(root / "syn" / "train"), loaded.transform, workers=0))
    assert whole.keys == keys and [caps[0] for caps in whole.captions] == captions
    np.testing.assert_allclose(np.concatenate(images), whole.features, atol=1e-6)
    np.testing.assert_allclose(np.concatenate(texts), embed_texts(loaded, captions)[0], atol=1e-6)


def test_resume_redoes_only_missing_or_corrupt_parts(job, tmp_path, capsys):
    _, argv, local = job
    out = tmp_path / "out"
    shutil.copytree(local, out)
    (out / "img_emb" / "img_emb_00002.npy").unlink()                         # a part a kill left unfinished
    with open(out / "metadata" / "metadata_00004.parquet", "r+b") as handle:  # a truncated file
        handle.truncate(100)
    with open(out / "text_emb" / "text_emb_00005.npy", "r+b") as handle:     # same size, other bytes
        handle.seek(-4, 2)
        handle.write(b"\0\0\0\0")
    kept = {name: (out / "parts" / f"{name}.json").stat().st_mtime_ns for name in ("00000", "00001", "00003")}
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 0
    assert "(3 made, 3 kept)" in capsys.readouterr().out
    assert digests(out) == digests(local)
    assert info_without_timings(out) == info_without_timings(local)
    assert {name: (out / "parts" / f"{name}.json").stat().st_mtime_ns for name in kept} == kept
    # another model / precision / modality on the same OUT: refused in one line unless --overwrite
    for change in (["--precision", "bf16"], ["--modality", "image"]):
        assert main([*argv, *change, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("mmssl: error: ") and "--overwrite" in err and err.count("\n") == 1
    image_only = ["image" if arg == "image,text" else arg for arg in argv]
    assert main([*image_only, "--out", str(out), "--overwrite"]) == 0
    assert not list((out / "text_emb").iterdir()) and json.loads((out / "embed_info.json").read_text())["modalities"] == ["image"]
    assert {k: v for k, v in digests(out).items()} == {k: v for k, v in digests(local).items() if "text_emb" not in k}


def test_ray_engine_writes_the_same_bits_even_when_a_worker_is_killed(job, ray_cluster, tmp_path, monkeypatch):
    """One Ray run (actors start slowly here) checks both: equal to the local run bit for bit, and a
    SIGKILLed actor process replaced with its part redone, every part there once."""
    _, argv, local = job
    out = tmp_path / "killed"
    monkeypatch.setenv("MMSSL_EMBED_TEST_DELAY_S", "1.0")    # each part sleeps 1 s before its work
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault("rc", main([*argv, "--out", str(out),
                                                                          "--engine", "ray"])))
    runner.start()
    deadline = time.monotonic() + 120
    while not list((out / "parts").glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.02)
    first = json.loads(next((out / "parts").glob("*.json")).read_text())
    os.kill(first["worker"]["pid"], signal.SIGKILL)            # mid-way through its next part's sleep
    runner.join(timeout=180)
    assert result["rc"] == 0
    records = [json.loads((out / "parts" / f"{name}.json").read_text()) for name in PARTS]
    pids = {record["worker"]["pid"] for record in records}
    assert first["worker"]["pid"] in pids and len(pids) == 3    # 2 actors + the replacement of the killed one
    assert digests(out) == digests(local) and len(digests(local)) == 18
    assert info_without_timings(out) == info_without_timings(local)
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == [f"img_emb_{p}.npy" for p in PARTS]


# --- index build over the folder ----------------------------------------------------------------

def test_index_build_over_the_folder_equals_the_concatenated_npy(job, tmp_path):
    from eval.index.store import load_index_folder

    _, _, out = job
    assert main(["index", "build", "--embeddings", str(out), "--out", str(tmp_path / "from_dir"),
                 "--modality", "image,text"]) == 0
    image = np.concatenate([np.load(out / "img_emb" / f"img_emb_{p}.npy") for p in PARTS])
    text = np.concatenate([np.load(out / "text_emb" / f"text_emb_{p}.npy") for p in PARTS])
    tables = [pq.read_table(out / "metadata" / f"metadata_{p}.parquet") for p in PARTS]
    np.save(tmp_path / "image.npy", image), np.save(tmp_path / "text.npy", text)
    import pyarrow as pa

    pq.write_table(pa.concat_tables(tables), tmp_path / "meta.parquet")
    shard_folder = str(Path(tables[0].column("shard")[0].as_py()).parent)
    assert main(["index", "build", "--embeddings", str(tmp_path / "image.npy"), "--metadata",
                 str(tmp_path / "meta.parquet"), "--text-embeddings", str(tmp_path / "text.npy"),
                 "--modality", "image,text", "--image-root", shard_folder, "--out", str(tmp_path / "from_npy")]) == 0
    from_dir, from_npy = load_index_folder(tmp_path / "from_dir"), load_index_folder(tmp_path / "from_npy")
    assert from_dir.metadata.keys == from_npy.metadata.keys and len(from_dir.metadata) == 48
    assert from_dir.info["image_roots"] == from_npy.info["image_roots"] == [os.path.realpath(shard_folder)]
    for modality, queries in (("image", text[:10]), ("text", image[:10])):
        scores_dir, ids_dir = from_dir.index_for(modality).search(queries, 5)
        scores_npy, ids_npy = from_npy.index_for(modality).search(queries, 5)
        assert ids_dir.tolist() == ids_npy.tolist()
        np.testing.assert_array_equal(scores_dir, scores_npy)


def _hostile(out: Path, name: str, tmp_path: Path) -> Path:
    bad = tmp_path / name
    shutil.copytree(out, bad)
    info = json.loads((bad / "embed_info.json").read_text())
    if name == "outside":
        files = info["parts"][0]["files"]
        files["../../etc/img_emb.npy"] = files.pop("img_emb/img_emb_00000.npy")
    elif name == "symlink":
        (tmp_path / "elsewhere.npy").write_bytes((bad / "img_emb" / "img_emb_00000.npy").read_bytes())
        (bad / "img_emb" / "img_emb_00000.npy").unlink()
        (bad / "img_emb" / "img_emb_00000.npy").symlink_to(tmp_path / "elsewhere.npy")
    elif name == "dims":
        info["dim"] = 16
    elif name == "missing":
        (bad / "img_emb" / "img_emb_00003.npy").unlink()
    elif name == "rows":
        info["parts"][1]["rows"] = 9
    (bad / "embed_info.json").write_text(json.dumps(info))
    return bad


@pytest.mark.parametrize("name, message", [
    ("outside", "files must be exactly"), ("symlink", "points outside"), ("dims", "expected float32 8x16"),
    ("missing", "img_emb/img_emb_00003.npy is missing"), ("rows", "expected float32 9x32"),
])
def test_hostile_embedding_folder_is_refused_in_one_line(job, tmp_path, capsys, name, message):
    _, _, out = job
    bad = _hostile(out, name, tmp_path)
    capsys.readouterr()
    assert main(["index", "build", "--embeddings", str(bad), "--out", str(tmp_path / "idx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmssl: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "idx").exists()
