"""The search service over a real index of synthetic shards (tiny random-init model), through a
real HTTP client on a loopback port; `mmssl index search` on the same index; the web page in
headless Chromium."""
import base64
import json
import shutil
import socket
import subprocess
import tarfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from helpers import CHROMIUM, CHROMIUM_FLAGS, INDEX_MODEL
from mmssl.cli import main

NUM_ITEMS = 40


# index_dir (NUM_ITEMS val images), searcher, server and client are fixtures in conftest.py


def _exact_top_k(searcher, query_vector, k):
    """Brute force over the stored vectors (the small index is Flat, so they are exact)."""
    stored = searcher.folder.index.reconstruct_n(0, searcher.folder.index.ntotal)
    scores = stored @ query_vector
    order = np.argsort(-scores, kind="stable")[:k]
    return [searcher.folder.metadata.keys[i] for i in order], scores[order]


def test_health(client):
    response = client.get("/health")
    health = response.json()
    assert response.status_code == 200 and health["status"] == "ok" and health["count"] == NUM_ITEMS
    assert health["index"] == "Flat" and health["model"] == INDEX_MODEL
    assert health["queue_depth"] == 0 and health["max_queue"] == 256 and health["worker_restarts"] == 0


def test_text_search_matches_exact_search_and_cli(client, searcher, index_dir, capsys):
    response = client.post("/search", json={"text": "a red circle", "k": 5})
    assert response.status_code == 200
    body = response.json()
    results = body["results"]
    keys, scores = _exact_top_k(searcher, searcher.encoder.encode_texts(["a red circle"])[0], 5)
    assert [hit["key"] for hit in results] == keys
    np.testing.assert_allclose([hit["score"] for hit in results], scores, atol=1e-5)
    assert [hit["rank"] for hit in results] == [1, 2, 3, 4, 5]
    assert all(hit["image_url"] == f"/image/{hit['key']}" and hit["caption"] for hit in results)
    assert body["took_ms"] > 0

    output = index_dir.parent / "hits.json"
    assert main(["index", "search", "--index", str(index_dir), "--text", "a red circle", "-k", "5",
                 "--output", str(output)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    written = json.loads(output.read_text())
    assert written["query"] == "a red circle" and [hit["key"] for hit in written["results"]] == keys
    assert all(hit["shard"].endswith(".tar") and hit["image_size"] > 0 for hit in written["results"])
    assert [hit["rank"] for hit in written["results"]] == [1, 2, 3, 4, 5]
    assert lines[0].split() == ["rank", "score", "key", "caption"]
    assert [line.split()[2] for line in lines[1:]] == keys
    assert [line.split(None, 3)[3] for line in lines[1:]] == [hit["caption"] for hit in results]


def test_image_fetch_returns_the_shard_bytes(client, index_dir):
    source = json.loads((index_dir / "index_info.json").read_text())["source"]["data"]
    with tarfile.open(f"{source}/00000.tar") as tar:
        member = next(m for m in tar if m.name.endswith(".jpg"))
        expected = tar.extractfile(member).read()
    key = member.name.split(".")[0]
    response = client.get(f"/image/{key}")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert response.content == expected
    missing = client.get("/image/no-such-key")
    assert missing.status_code == 404 and "no item with key" in missing.json()["error"]


def test_image_search_finds_the_same_image_first(client, searcher):
    key = searcher.folder.metadata.keys[7]
    image = client.get(f"/image/{key}").content
    response = client.post("/search", json={"image": base64.b64encode(image).decode(), "k": 3})
    assert response.status_code == 200
    top = response.json()["results"][0]
    assert top["key"] == key and top["score"] > 0.99


def test_concurrent_requests_are_batched_without_mixing_answers(client, searcher):
    texts = [f"a {colour} {shape}" for colour in ("red", "blue", "green", "white") for shape in ("circle", "star")]
    k_of = {text: 2 + i % 3 for i, text in enumerate(texts)}   # different k within one batch
    expected = {text: _exact_top_k(searcher, searcher.encoder.encode_texts([text])[0], k_of[text])[0]
                for text in texts}

    def ask(text):
        return text, client.post("/search", json={"text": text, "k": k_of[text]}).json()["results"]

    served_before = client.get("/health").json()["queries_served"]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, texts * 3))
    for text, results in answers:
        assert [hit["key"] for hit in results] == expected[text]
    assert client.get("/health").json()["queries_served"] - served_before == len(answers)


def _base64_of_non_image() -> str:
    return base64.b64encode(b"this is not an image at all").decode()


@pytest.mark.parametrize("payload, status, message", [
    ({"text": ""}, 400, "non-empty string"),
    ({"text": "   "}, 400, "non-empty string"),
    ({"text": 5}, 400, "non-empty string"),
    ({}, 400, "exactly one of 'text' or 'image'"),
    ({"text": "a", "image": "aGVsbG8="}, 400, "exactly one of 'text' or 'image'"),
    ({"text": "a", "k": 0}, 400, "k must be an integer in 1..1000"),
    ({"text": "a", "k": 1001}, 400, "k must be an integer in 1..1000"),
    ({"text": "a", "k": "5"}, 400, "k must be an integer in 1..1000"),
    ({"text": "a", "k": True}, 400, "k must be an integer in 1..1000"),
    ({"text": "a", "limit": 3}, 400, "unknown field(s): limit"),
    ({"image": "***not base64***"}, 400, "not valid base64"),
    ({"image": _base64_of_non_image()}, 400, "not a JPEG, PNG, WebP or GIF image"),
    ({"text": "a" * 1001}, 400, "the limit is 1000 (--max-text-chars)"),
    ([1, 2], 400, "must be a JSON object"),
])
def test_bad_requests_get_4xx_json(client, payload, status, message):
    response = client.post("/search", json=payload)
    assert response.status_code == status
    assert message in response.json()["error"]


def test_malformed_and_oversized_bodies(client):
    not_json = client.post("/search", content=b"{text: nope", headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and not_json.json()["error"] == "body is not valid JSON"
    big = json.dumps({"image": "A" * (10 * 2**20)}).encode()
    json_type = {"content-type": "application/json"}
    declared = client.post("/search", content=big, headers=json_type)
    assert declared.status_code == 413 and "over 10485760 bytes" in declared.json()["error"]
    chunked = client.post("/search", content=(big[i:i + 2**20] for i in range(0, len(big), 2**20)),
                          headers=json_type)
    assert chunked.status_code == 413
    assert client.get("/search").status_code == 405


def test_still_serving_after_bad_requests(client):
    for payload in ({"text": ""}, {"k": -1}, {"image": "x"}):
        assert client.post("/search", json=payload).status_code == 400
    assert client.get("/health").json()["status"] == "ok"
    response = client.post("/search", json={"text": "a blue star", "k": 3})
    assert response.status_code == 200 and len(response.json()["results"]) == 3


def test_page_is_self_contained(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="search-form"' in page.text and "fetch(\"/search\"" in page.text
    assert "src=\"http" not in page.text and "href=\"http" not in page.text


def test_serve_refuses_a_taken_port(index_dir, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", "--index", str(index_dir), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmssl: error: cannot listen on 127.0.0.1:") and err.count("\n") == 1


@pytest.mark.skipif(shutil.which(CHROMIUM) is None,
                    reason="Debian's chromium is not installed (apt-get install -y chromium)")
def test_web_page_shows_results_in_headless_chromium(server, tmp_path):
    command = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
               "--dump-dom",
               f"{server}/?q=red+circle"]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120).stdout
    assert dom.count('<div class="result">') == 20     # the page asks for 20 by default
    assert dom.count('src="/image/') == 20
    assert '20 results for "red circle"' in dom
