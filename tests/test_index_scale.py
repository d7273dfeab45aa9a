"""`mmssl index build --engine ray` (IVF parts added on a Ray cluster, merged in order) and
`--on-disk` (the inverted lists in a memory-mapped index.ivfdata): both answer exactly like the
local in-memory build of the same vectors."""
import json
import shutil
import subprocess
import sys
import textwrap

import faiss
import numpy as np
import pytest

from eval.index.store import load_index_folder
from helpers import exit_code

N, DIM, CENTRES = 30_000, 128, 64


def run(*argv) -> int:
    return exit_code(["index", "build", *map(str, argv)])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """30k clustered 128-d vectors (.npy) and 200 new queries from the same clusters, not indexed."""
    root = tmp_path_factory.mktemp("scale")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((CENTRES, DIM)).astype(np.float32)
    def draw(rows):
        return (centres[rng.integers(0, CENTRES, rows)] + 0.5 * rng.standard_normal((rows, DIM))).astype(np.float32)
    np.save(root / "vectors.npy", draw(N))
    queries = draw(200)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return root, queries


@pytest.fixture(scope="module")
def in_memory(data):
    root, _ = data
    assert run("--embeddings", root / "vectors.npy", "--out", root / "local", "--index-type", "ivf_flat") == 0
    return root / "local"


@pytest.fixture(scope="module")
def on_disk(data):
    root, _ = data
    assert run("--embeddings", root / "vectors.npy", "--out", root / "disk", "--index-type", "ivf_flat",
               "--on-disk") == 0
    return root / "disk"


def answers(folder, queries, k=10):
    return load_index_folder(folder).index.search(queries, k)


def info(folder) -> dict:
    return json.loads((folder / "index_info.json").read_text())


def test_the_ray_build_equals_the_local_build(ray_cluster, data, in_memory):
    root, queries = data
    assert run("--embeddings", root / "vectors.npy", "--out", root / "ray", "--index-type", "ivf_flat",
               "--engine", "ray") == 0
    local, ray = info(in_memory), info(root / "ray")
    engine = ray["engine"]
    assert engine["name"] == "ray" and engine["parallel_add"] is True and engine["parts"] >= 2
    assert sum(engine["rows_per_part"]) == N - 2 * local["held_out"]["num_queries"]   # held-out rows stay out
    assert local["engine"] == {"name": "local"}
    assert ray["search"] == local["search"] and ray["search"]["param"] == "nprobe"
    assert ray["held_out"] == local["held_out"] and ray["tuning"]["curve"] == local["tuning"]["curve"]
    assert ray["files"]["index.faiss"] == local["files"]["index.faiss"]      # the same bytes: same lists, same ids
    (ray_scores, ray_ids), (scores, ids) = answers(root / "ray", queries), answers(in_memory, queries)
    assert np.array_equal(ray_ids, ids) and np.array_equal(ray_scores, scores)
    assert {"train", "add", "merge", "tune"} <= set(ray["timings_s"])


def test_with_ray_an_hnsw_graph_is_built_on_the_driver_and_says_why(ray_cluster, data):
    root, _ = data
    small = root / "small.npy"
    np.save(small, np.load(root / "vectors.npy")[:3000])
    assert run("--embeddings", small, "--out", root / "hnsw", "--index-type", "hnsw_sq8", "--engine", "ray") == 0
    engine = info(root / "hnsw")["engine"]
    assert engine["parallel_add"] is False and "cannot be merged" in engine["reason"]


def test_on_disk_lists_answer_like_in_memory_ones_and_move_with_the_folder(data, in_memory, on_disk, tmp_path):
    _, queries = data
    disk = info(on_disk)
    assert disk["on_disk"] is True and info(in_memory)["on_disk"] is False
    lists = on_disk / "index.ivfdata"
    assert disk["files"]["index.ivfdata"]["bytes"] == lists.stat().st_size >= N * (4 * DIM + 8)
    assert (on_disk / "index.faiss").stat().st_size * 20 < (in_memory / "index.faiss").stat().st_size
    assert disk["search"] == info(in_memory)["search"] and disk["held_out"] == info(in_memory)["held_out"]
    scores, ids = answers(in_memory, queries)
    disk_scores, disk_ids = answers(on_disk, queries)
    assert np.array_equal(disk_ids, ids) and np.array_equal(disk_scores, scores)
    moved = shutil.copytree(on_disk, tmp_path / "elsewhere" / "moved")
    folder = load_index_folder(moved)
    assert np.array_equal(folder.index.search(queries, 10)[1], ids)
    lists_file = faiss.downcast_InvertedLists(faiss.extract_index_ivf(folder.index).invlists).filename
    assert lists_file == str(moved / "index.ivfdata")        # found beside index.faiss, not where it was built


def test_an_on_disk_build_grows_its_lists_on_disk_on_either_engine(ray_cluster, data, in_memory, tmp_path,
                                                                    monkeypatch):
    """Rows are added (and Ray's parts merged) straight into lists on disk, never built whole in
    memory first; packing them at the end gives the same index.ivfdata as moving in-memory lists."""
    import faiss

    from eval.index import store

    packed_from = []
    move = store.move_lists_on_disk

    def recording_move(index, path):
        lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
        packed_from.append(type(lists).__name__)
        move(index, path)

    reference = tmp_path / "reference.ivfdata"          # the in-memory build's lists, moved to disk
    move(load_index_folder(in_memory).index, reference)
    monkeypatch.setattr(store, "move_lists_on_disk", recording_move)
    root, queries = data
    for engine in ("local", "ray"):
        out = tmp_path / engine
        assert run("--embeddings", root / "vectors.npy", "--out", out, "--index-type", "ivf_flat", "--on-disk",
                   "--engine", engine) == 0
        assert packed_from[-1] == "OnDiskInvertedLists"
        assert info(out)["on_disk"] is True and info(out)["held_out"] == info(in_memory)["held_out"]
        assert (out / "index.ivfdata").read_bytes() == reference.read_bytes()
        assert sorted(p.name for p in out.iterdir()) == ["index.faiss", "index.ivfdata", "index_info.json",
                                                         "metadata.parquet"]
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no staging left
        scores, ids = answers(in_memory, queries)
        disk_scores, disk_ids = answers(out, queries)
        assert np.array_equal(disk_ids, ids) and np.array_equal(disk_scores, scores)


def test_a_tampered_list_file_is_refused_in_one_line(on_disk, tmp_path, capsys):
    copy = shutil.copytree(on_disk, tmp_path / "tampered")
    with open(copy / "index.ivfdata", "r+b") as handle:
        handle.seek(1000)
        byte = handle.read(1)
        handle.seek(1000)
        handle.write(bytes([byte[0] ^ 1]))
    capsys.readouterr()
    assert exit_code(["index", "search", "--index", str(copy), "--text", "a dog"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "index.ivfdata: SHA-256 differs" in err[0]


def test_a_list_file_the_info_does_not_declare_is_refused(on_disk, tmp_path, capsys):
    copy = shutil.copytree(on_disk, tmp_path / "hidden")
    hidden = info(copy)
    hidden["on_disk"] = False
    del hidden["files"]["index.ivfdata"]
    (copy / "index_info.json").write_text(json.dumps(hidden))
    capsys.readouterr()
    assert exit_code(["index", "search", "--index", str(copy), "--text", "a dog"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "inverted lists are on disk but index_info.json says in memory" in err[0]


def test_on_disk_needs_an_ivf_plan(data, capsys):
    root, _ = data
    small = root / "tiny.npy"
    np.save(small, np.load(root / "vectors.npy")[:2000])
    capsys.readouterr()
    assert run("--embeddings", small, "--out", root / "tiny", "--on-disk") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--on-disk needs an IVF index" in err[0] and "flat" in err[0]
    assert not (root / "tiny").exists()
    assert run("--embeddings", small, "--out", root / "tiny", "--on-disk", "--index-type", "hnsw_sq8") == 2
    assert "not hnsw_sq8" in capsys.readouterr().err


MEASURE = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from eval.index.store import INDEX_FILE, _read_faiss_file, load_index_folder, read_info
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    load_index_folder(sys.argv[1])     # a tiny folder first: what loading imports is not counted
    folder = Path(sys.argv[2])
    before = rss()
    if sys.argv[3] == "index":
        loaded = _read_faiss_file(folder, INDEX_FILE, read_info(folder))
    else:
        loaded = load_index_folder(folder)
    print(json.dumps(rss() - before))
""")


def test_loading_on_disk_lists_leaves_them_out_of_process_memory(data, in_memory, on_disk):
    """Resident memory (/proc/self/statm) that reading index.faiss, or loading the whole folder
    (metadata included), adds in a fresh process."""
    root, _ = data
    warm_up = root / "warm.npy"
    np.save(warm_up, np.load(root / "vectors.npy")[:500])
    assert run("--embeddings", warm_up, "--out", root / "warm") == 0

    def added(folder, what: str) -> int:
        out = subprocess.run([sys.executable, "-c", MEASURE, str(root / "warm"), str(folder), what],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    lists = (on_disk / "index.ivfdata").stat().st_size          # 15.6 MB of vectors and ids
    memory = {what: added(in_memory, what) for what in ("index", "folder")}
    disk = {what: added(on_disk, what) for what in ("index", "folder")}
    print(f"resident bytes added, in memory: {memory}, on disk: {disk}, lists: {lists}")
    assert memory["index"] > 0.8 * lists and disk["index"] < 0.05 * lists
    assert memory["folder"] - disk["folder"] > 0.6 * lists      # the metadata costs both the same


def test_index_type_forces_the_kind_with_the_choosers_knobs():
    from eval.index.choose import choose_index, plan_for_kind
    from mmssl.errors import UserError

    budget = 4 << 30
    assert plan_for_kind("auto", N, DIM, budget) == choose_index(N, DIM, budget)
    forced = {kind: plan_for_kind(kind, N, DIM, budget) for kind in ("flat", "hnsw_sq8", "ivf_flat", "opq_ivf_pq")}
    assert [plan.factory for plan in forced.values()] == ["Flat", "HNSW32,SQ8", "IVF512,Flat", "OPQ64_128,IVF512,PQ64x8"]
    assert all(plan.reason.startswith("--index-type") for plan in forced.values())
    with pytest.raises(UserError, match="does not fit --memory-budget"):
        plan_for_kind("ivf_flat", N, DIM, N * DIM)      # a quarter of the float vectors
