"""`mmssl serve` picks up a grown index folder on POST /reload and on SIGHUP without dropping a
request: a live service on a loopback port answers a stream of concurrent searches while
`mmssl index add` runs and the reload swaps the new version in; a folder that fails to load
leaves the old version serving; only loopback clients may reload."""
import asyncio
import json
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eval.index.search import Searcher
from eval.serve.app import create_app, is_loopback
from eval.serve.options import ServeOptions
from eval.serve.service import Service
from helpers import exit_code, serving

NUM_ITEMS = 40
ADDED = ["a zebra juggling teacups", "a violet submarine", "an orchestra of snails"]


# index_dir (NUM_ITEMS val images, openclip:tiny-vit-64) and searcher are fixtures in conftest.py


def _new_items(folder, encoder, texts, prefix):
    """Embeddings (the index model's text vectors) and metadata of items to add, written beside `folder`."""
    vectors = encoder.encode_texts(texts)
    np.save(folder / f"{prefix}.npy", vectors)
    pq.write_table(pa.table({"key": [f"{prefix}-{i}" for i in range(len(texts))], "caption": texts}),
                   folder / f"{prefix}.parquet")
    return ["index", "add", "--index", None, "--embeddings", str(folder / f"{prefix}.npy"),
            "--metadata", str(folder / f"{prefix}.parquet")]


def test_reload_under_load_drops_nothing(index_dir, searcher, tmp_path, monkeypatch):
    from eval.index.query import QueryEncoder

    add = _new_items(tmp_path, searcher.encoder, ADDED, "added")
    add[3] = str(index_dir)
    statuses, counts, stop = [], {"done": 0}, threading.Event()

    def hammer(texts):     # until told to stop, at most 1000 requests
        with httpx.Client(timeout=30) as http:
            for i in range(1000):
                if stop.is_set():
                    return
                response = http.post(f"{url}/search", json={"text": texts[i % len(texts)], "k": 5})
                statuses.append(response.status_code)
                counts["done"] += 1

    with serving(searcher) as url, httpx.Client(base_url=url, timeout=30) as client:
        health = client.get("/health").json()
        assert health["count"] == NUM_ITEMS and health["indices"]["index"]["count"] == NUM_ITEMS
        old_version = health["version"]
        threads = [threading.Thread(target=hammer, args=(texts,)) for texts in
                   (["a red circle", "a blue star"], ["a green square", ADDED[1]])]
        for thread in threads:
            thread.start()
        while counts["done"] < 20:
            time.sleep(0.01)
        assert exit_code(add) == 0                      # the server still answers from the old version
        monkeypatch.setattr(QueryEncoder, "from_checkpoint", lambda *a: pytest.fail("the reload loaded the model"))
        assert client.get("/health").json()["count"] == NUM_ITEMS
        reload = client.post("/reload")
        done_at_reload = counts["done"]
        while counts["done"] < done_at_reload + 20 and all(thread.is_alive() for thread in threads):
            time.sleep(0.01)
        stop.set()
        for thread in threads:
            thread.join()
        assert 20 <= done_at_reload and len(statuses) >= done_at_reload + 20   # the reload happened mid-stream
        assert set(statuses) == {200}

        assert reload.status_code == 200
        change = reload.json()["reloaded"]["index"]
        assert change["old_count"] == NUM_ITEMS and change["new_count"] == NUM_ITEMS + len(ADDED)
        assert change["old_version"] == old_version and change["new_version"] != old_version
        assert change["took_ms"] > 0
        health = client.get("/health").json()
        assert health["count"] == NUM_ITEMS + len(ADDED) and health["version"] == change["new_version"]
        assert health["version"] == json.loads((index_dir / "index_info.json").read_text())["keys_sha256"][:12]
        assert health["reloads"] == 1 and health["queries_served"] >= len(statuses)     # counters carried over
        for i, text in enumerate(ADDED):
            top = client.post("/search", json={"text": text, "k": 3}).json()["results"][0]
            assert top["key"] == f"added-{i}" and top["score"] > 0.999 and top["caption"] == text

        # a folder that no longer loads: error JSON, nothing swapped, the old version keeps serving
        faiss_file = index_dir / "index.faiss"
        good = faiss_file.read_bytes()
        faiss_file.write_bytes(good + b"x")
        try:
            broken = client.post("/reload")
        finally:
            faiss_file.write_bytes(good)
        assert broken.status_code == 422, broken.text
        error = broken.json()["error"]
        assert error.startswith("index 'index': ") and "index.faiss is" in error and "still serving" in error
        health = client.get("/health").json()
        assert health["count"] == NUM_ITEMS + len(ADDED) and health["reloads_failed"] == 1
        top = client.post("/search", json={"text": ADDED[2], "k": 1}).json()["results"][0]
        assert top["key"] == "added-2"


def test_queries_queued_on_the_old_version_finish_on_it(tmp_path):
    """After the swap the retired worker still answers, from the old folder; new queries see the new one."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((60, 8)).astype(np.float32)
    np.save(tmp_path / "a.npy", vectors[:50])
    np.save(tmp_path / "b.npy", vectors[50:])
    assert exit_code(["index", "build", "--embeddings", str(tmp_path / "a.npy"), "--out", str(tmp_path / "idx")]) == 0
    service = Service({"idx": Searcher.open(str(tmp_path / "idx"))}, ServeOptions())
    query = vectors[55] / np.linalg.norm(vectors[55])

    async def scenario():
        service.start()
        try:
            old = service.indexes["idx"]
            assert exit_code(["index", "add", "--index", str(tmp_path / "idx"), "--embeddings",
                              str(tmp_path / "b.npy")]) == 0
            answer = await service.reload()
            new = service.indexes["idx"]
            assert answer["idx"]["old_count"] == 50 and answer["idx"]["new_count"] == 60 and new is not old
            assert old.batcher.alive                         # retired, not stopped: it drains first
            old_hits = await asyncio.wrap_future(old.batcher.submit("vector", query, 100))
            new_hits = await asyncio.wrap_future(new.batcher.submit("vector", query, 100))
            return old_hits, new_hits
        finally:
            service.stop()

    old_hits, new_hits = asyncio.run(scenario())
    assert len(old_hits) == 50 and max(hit.id for hit in old_hits) == 49
    assert len(new_hits) == 60 and new_hits[0].key == "55" and new_hits[0].score > 0.9999
    assert not service.indexes["idx"].batcher.alive


def test_only_loopback_clients_may_reload(searcher):
    from starlette.testclient import TestClient

    assert is_loopback("127.0.0.1") and is_loopback("127.3.2.1") and is_loopback("::1")
    assert is_loopback("::ffff:127.0.0.1")
    assert not any(is_loopback(host) for host in ("10.0.0.1", "192.168.1.2", "::ffff:10.0.0.1", "testclient", "", None))

    for allow in (False, True):    # the TestClient's client is "testclient": not loopback
        app = create_app(searcher, ServeOptions(allowed_hosts=("testserver",), allow_remote_reload=allow))
        http = TestClient(app)
        if not allow:
            refused = http.post("/reload")
            assert refused.status_code == 403 and "--allow-remote-reload" in refused.json()["error"]
            continue
        browser = http.post("/reload", headers={"Origin": "http://evil.example"})
        assert browser.status_code == 403 and "Origin" in browser.json()["error"]
        app.state.service.reloading = True
        busy = http.post("/reload")
        assert busy.status_code == 409 and "already running" in busy.json()["error"]


def test_sighup_reloads_a_running_mmssl_serve(tmp_path):
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((45, 8)).astype(np.float32)
    np.save(tmp_path / "a.npy", vectors[:40])
    np.save(tmp_path / "b.npy", vectors[40:])
    folder = tmp_path / "vec"
    assert exit_code(["index", "build", "--embeddings", str(tmp_path / "a.npy"), "--out", str(folder)]) == 0
    process = subprocess.Popen([sys.executable, "-m", "mmssl", "serve", "--index", str(folder), "--port", "0",
                                "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/health").json()["count"] == 40
            assert exit_code(["index", "add", "--index", str(folder), "--embeddings", str(tmp_path / "b.npy")]) == 0
            process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while client.get("/health").json()["count"] != 45 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert client.get("/health").json()["count"] == 45
            hits = client.post("/knn-service", json={"embedding_input": vectors[42].tolist(), "num_images": 1}).json()
            assert hits[0]["key"] == "42" and hits[0]["id"] == 42 and hits[0]["similarity"] > 0.9999
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    assert "reloaded vec: 40 -> 45 items" in err
    assert process.returncode in (0, -signal.SIGTERM)   # uvicorn re-raises the signal it shut down on
