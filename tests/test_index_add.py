"""`mmssl index add`: growing an index folder without retraining equals building it with every item
(Flat, so the comparison is exact), refuses what would break the folder with one line and leaves
it byte-for-byte unchanged, and a failed or killed add leaves the previous version loadable."""
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eval.index.metadata import keys_checksum
from eval.index.search import Searcher
from eval.index.store import load_index_folder
from helpers import exit_code

DIM, FIRST, SECOND = 16, 200, 100


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    """FIRST + SECOND random vectors, their caption vectors and metadata, split into two halves."""
    root = tmp_path_factory.mktemp("add_items")
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((FIRST + SECOND, DIM)).astype(np.float32)
    texts = rng.standard_normal((FIRST + SECOND, DIM)).astype(np.float32)
    keys = [f"item{i:04d}" for i in range(FIRST + SECOND)]
    table = pa.table({"key": keys, "caption": [f"caption of {key}" for key in keys],
                      "url": [f"https://example.com/{key}.jpg" for key in keys]})
    for name, rows in (("all", slice(None)), ("first", slice(0, FIRST)), ("second", slice(FIRST, None))):
        np.save(root / f"{name}.npy", vectors[rows])
        np.save(root / f"{name}_text.npy", texts[rows])
        pq.write_table(table.slice(rows.start or 0, len(vectors[rows])), root / f"{name}.parquet")
    return root, vectors, texts


def _build(items, name, out, *extra):
    root = items[0]
    assert exit_code(["index", "build", "--embeddings", str(root / f"{name}.npy"), "--metadata",
                      str(root / f"{name}.parquet"), "--out", str(out), *extra]) == 0
    return out


def _folder_bytes(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def _assert_one_line_error(capsys, argv, message):
    capsys.readouterr()
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmssl: error: ") and err.count("\n") == 1 and message in err, err


def test_add_equals_a_build_of_both_halves(items, tmp_path):
    root, vectors, _ = items
    full = _build(items, "all", tmp_path / "full")
    grown = _build(items, "first", tmp_path / "grown")
    before = json.loads((grown / "index_info.json").read_text())
    assert exit_code(["index", "add", "--index", str(grown), "--embeddings", str(root / "second.npy"),
                      "--metadata", str(root / "second.parquet")]) == 0

    full_folder, grown_folder = load_index_folder(full), load_index_folder(grown)
    info = grown_folder.info
    assert info["count"] == FIRST + SECOND == grown_folder.index.ntotal
    assert info["additions"][0]["count_before"] == FIRST and info["additions"][0]["added"] == SECOND
    assert info["search"] == before["search"] and info["held_out"] == before["held_out"]   # no re-tuning
    assert info["keys_sha256"] == keys_checksum(grown_folder.metadata.keys) == full_folder.info["keys_sha256"]
    # every key's metadata row is the same in both folders
    full_rows = {key: full_folder.metadata.row(i) for i, key in enumerate(full_folder.metadata.keys)}
    assert {key: grown_folder.metadata.row(i) for i, key in enumerate(grown_folder.metadata.keys)} == full_rows
    assert grown_folder.metadata.keys[FIRST:] == [f"item{i:04d}" for i in range(FIRST, FIRST + SECOND)]

    queries = np.random.default_rng(1).standard_normal((25, DIM)).astype(np.float32)   # not in either index
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    full_hits = Searcher(full_folder).search_vectors(queries, 10)
    grown_hits = Searcher(grown_folder).search_vectors(queries, 10)
    for a, b in zip(full_hits, grown_hits):
        assert [hit.key for hit in a] == [hit.key for hit in b]
        assert [hit.score for hit in a] == [hit.score for hit in b]
    assert any(hit.key >= f"item{FIRST:04d}" for hits in grown_hits for hit in hits)   # the new half is found

    added = vectors[FIRST:] / np.linalg.norm(vectors[FIRST:], axis=1, keepdims=True)
    top = Searcher(grown_folder).search_vectors(added, 1)
    assert [hits[0].key for hits in top] == [f"item{i:04d}" for i in range(FIRST, FIRST + SECOND)]
    assert all(abs(hits[0].score - 1) < 1e-5 for hits in top)


def test_add_to_a_caption_index_grows_both_indexes(items, tmp_path, capsys):
    root, _, texts = items
    out = _build(items, "first", tmp_path / "captions", "--modality", "image,text",
                 "--text-embeddings", str(root / "first_text.npy"))
    unchanged = _folder_bytes(out)
    _assert_one_line_error(capsys, ["index", "add", "--index", str(out), "--embeddings", str(root / "second.npy"),
                                    "--metadata", str(root / "second.parquet")], "also indexes captions")
    assert _folder_bytes(out) == unchanged
    assert exit_code(["index", "add", "--index", str(out), "--embeddings", str(root / "second.npy"),
                      "--metadata", str(root / "second.parquet"),
                      "--text-embeddings", str(root / "second_text.npy")]) == 0
    folder = load_index_folder(out)
    assert folder.text_index.ntotal == folder.index.ntotal == FIRST + SECOND
    assert folder.info["text_index"]["count"] == FIRST + SECOND
    added = texts[FIRST:] / np.linalg.norm(texts[FIRST:], axis=1, keepdims=True)
    top = Searcher(folder).search_vectors(added, 1, modality="text")
    assert [hits[0].key for hits in top] == [f"item{i:04d}" for i in range(FIRST, FIRST + SECOND)]


def test_embeddings_without_metadata_are_numbered_on(tmp_path):
    rng = np.random.default_rng(2)
    np.save(tmp_path / "a.npy", rng.standard_normal((30, 8)).astype(np.float32))
    np.save(tmp_path / "b.npy", rng.standard_normal((12, 8)).astype(np.float32))
    assert exit_code(["index", "build", "--embeddings", str(tmp_path / "a.npy"), "--out", str(tmp_path / "idx")]) == 0
    for _ in range(2):
        assert exit_code(["index", "add", "--index", str(tmp_path / "idx"), "--embeddings",
                          str(tmp_path / "b.npy")]) == 0
    folder = load_index_folder(tmp_path / "idx")
    assert folder.metadata.keys == [str(i) for i in range(54)]
    assert [entry["count_before"] for entry in folder.info["additions"]] == [30, 42]


def test_refusals_leave_the_folder_unchanged(items, tmp_path, capsys):
    root = items[0]
    out = _build(items, "first", tmp_path / "idx")
    unchanged = _folder_bytes(out)
    add = ["index", "add", "--index", str(out)]

    pq.write_table(pa.table({"key": ["new-1", "item0007"], "caption": ["a", "b"]}), tmp_path / "dup.parquet")
    np.save(tmp_path / "two.npy", np.ones((2, DIM), np.float32))
    _assert_one_line_error(capsys, add + ["--embeddings", str(tmp_path / "two.npy"), "--metadata",
                                          str(tmp_path / "dup.parquet")], "1 of the 2 new keys are already in the index")
    np.save(tmp_path / "narrow.npy", np.ones((2, DIM // 2), np.float32))
    _assert_one_line_error(capsys, add + ["--embeddings", str(tmp_path / "narrow.npy")],
                           f"holds {DIM}-d vectors but the new ones are {DIM // 2}-d")
    np.save(tmp_path / "empty.npy", np.ones((0, DIM), np.float32))
    _assert_one_line_error(capsys, add + ["--embeddings", str(tmp_path / "empty.npy")], "non-empty")
    _assert_one_line_error(capsys, add + ["--embeddings", str(root / "second.npy"), "--metadata",
                                          str(tmp_path / "dup.parquet")], "row i must describe vector i")
    pq.write_table(pa.table({"key": ["n1", "n2"], "colour": ["red", "blue"]}), tmp_path / "extra.parquet")
    _assert_one_line_error(capsys, add + ["--embeddings", str(tmp_path / "two.npy"), "--metadata",
                                          str(tmp_path / "extra.parquet")], "column(s) colour are not in")
    _assert_one_line_error(capsys, add + ["--data", str(tmp_path), "--checkpoint", "openclip:tiny-vit-64"],
                           "index was built with embeddings without a model, not openclip:tiny-vit-64")
    _assert_one_line_error(capsys, ["index", "add", "--index", str(tmp_path / "nowhere"), "--embeddings",
                                    str(root / "second.npy")], "no such index folder")
    assert _folder_bytes(out) == unchanged


def test_model_must_match_the_folders(tmp_path, capsys):
    """A folder built with one model refuses --data embedded with another, before any embedding."""
    np.save(tmp_path / "e.npy", np.ones((3, DIM), np.float32))
    assert exit_code(["index", "build", "--embeddings", str(tmp_path / "e.npy"), "--out", str(tmp_path / "idx")]) == 0
    info_path = tmp_path / "idx" / "index_info.json"
    info_path.write_text(json.dumps({**json.loads(info_path.read_text()), "model": "openclip:tiny-vit-64"}))
    unchanged = _folder_bytes(tmp_path / "idx")
    _assert_one_line_error(capsys, ["index", "add", "--index", str(tmp_path / "idx"), "--data", str(tmp_path),
                                    "--checkpoint", "openclip:tiny-vit-32"],
                           "index was built with openclip:tiny-vit-64, not openclip:tiny-vit-32")
    assert _folder_bytes(tmp_path / "idx") == unchanged


def test_a_failed_save_leaves_the_old_version(items, tmp_path, monkeypatch):
    import faiss

    root = items[0]
    out = _build(items, "first", tmp_path / "idx")
    unchanged = _folder_bytes(out)
    real_write = faiss.write_index

    def write_then_fail(index, path):
        real_write(index, path)
        raise RuntimeError("disk gone mid-save")

    monkeypatch.setattr(faiss, "write_index", write_then_fail)
    with pytest.raises(RuntimeError, match="disk gone"):
        from mmssl.cli import main

        main(["index", "add", "--index", str(out), "--embeddings", str(root / "second.npy"),
              "--metadata", str(root / "second.parquet")])
    monkeypatch.undo()
    assert _folder_bytes(out) == unchanged
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".idx.building")) == []
    assert load_index_folder(out).info["count"] == FIRST


def test_a_killed_add_leaves_the_old_version(items, tmp_path):
    """SIGKILL in the middle of writing the new version: the old folder loads and answers as before."""
    root, vectors, _ = items
    out = _build(items, "first", tmp_path / "idx")
    unchanged = _folder_bytes(out)
    query = vectors[:3] / np.linalg.norm(vectors[:3], axis=1, keepdims=True)
    before = [[(hit.key, hit.score) for hit in hits] for hits in Searcher.open(str(out)).search_vectors(query, 5)]
    script = (
        "import os, signal, sys\n"
        "import eval.index.metadata as metadata\n"
        "def killed(*args): os.kill(os.getpid(), signal.SIGKILL)\n"
        "metadata.pq.write_table = killed\n"       # after index.faiss is staged, before the swap
        "from mmssl.cli import main\n"
        "main(sys.argv[1:])\n")
    done = subprocess.run([sys.executable, "-c", script, "index", "add", "--index", str(out), "--embeddings",
                           str(root / "second.npy"), "--metadata", str(root / "second.parquet")],
                          capture_output=True, timeout=120)
    assert done.returncode == -9
    assert any(p.name.startswith(".idx.building-") for p in out.parent.iterdir())   # the kill left its staging
    after = [[(hit.key, hit.score) for hit in hits] for hits in Searcher.open(str(out)).search_vectors(query, 5)]
    assert after == before
    assert _folder_bytes(out) == unchanged
    assert not any(p.name.startswith(".idx.building-") for p in out.parent.iterdir())   # cleaned on load
    assert exit_code(["index", "add", "--index", str(out), "--embeddings", str(root / "second.npy"),
                      "--metadata", str(root / "second.parquet")]) == 0            # and the add can be redone
    assert load_index_folder(out).info["count"] == FIRST + SECOND


def test_add_from_shards_embeds_with_the_folders_model(tmp_path):
    """--data: embedded with the index's model, captions into the caption index, the new shards'
    folder becomes an image root so their images are served."""
    from eval.index.stored_images import StoredImages
    from helpers import INDEX_MODEL, jpeg_bytes, write_shards

    first, second = write_shards(tmp_path / "a", [6], prefix="a"), write_shards(tmp_path / "b", [3, 4], prefix="b")
    out = tmp_path / "idx"
    assert exit_code(["index", "build", "--checkpoint", INDEX_MODEL, "--data", str(first), "--out", str(out),
                      "--workers", "0", "--modality", "image,text"]) == 0
    assert exit_code(["index", "add", "--index", str(out), "--checkpoint", INDEX_MODEL, "--data", str(second),
                      "--workers", "0"]) == 0
    searcher = Searcher.open(str(out))
    folder = searcher.folder
    assert folder.info["count"] == folder.index.ntotal == folder.text_index.ntotal == 13
    assert folder.metadata.keys[6:] == [f"b00000{i:04d}" for i in range(3)] + [f"b00001{i:04d}" for i in range(4)]
    assert str(second.resolve()) in folder.info["image_roots"]
    new_id = folder.metadata.key_to_id["b000010002"]
    assert StoredImages.for_folder(folder).read(new_id)[0] == jpeg_bytes(1002)
    image_hit = searcher.search_images([searcher.encoder.prepare_image(jpeg_bytes(1002))], 1)[0][0]
    assert image_hit.key == "b000010002" and image_hit.score > 0.999
    text_hit = searcher.search_texts(["caption of b000010002"], 1, modality="text")[0][0]
    assert text_hit.key == "b000010002" and text_hit.score > 0.999
