"""clip-retrieval's back-end protocol on `mmssl serve`, driven by clip-retrieval's own, unmodified
ClipClient and web front (loaded from the clip-retrieval 2.45 wheel that .ci/run installs into
.anchors/). Two indexes over the same 40 synthetic images: "syn" with a caption index
(`--modality image,text`), "plain" without."""
import base64
import http.server
import importlib.util
import json
import shutil
import subprocess
import tarfile

import numpy as np
import pytest
import requests

from helpers import CHROMIUM, CHROMIUM_FLAGS, anchor, build_index, http_server, serving

NUM_ITEMS = 40


@pytest.fixture(scope="module")
def indexes(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_retrieval")
    return {"syn": build_index(root, NUM_ITEMS, modality="image,text", name="syn"),
            "plain": build_index(root, NUM_ITEMS, name="plain")}


@pytest.fixture(scope="module")
def searchers(indexes):
    from eval.index.search import Searcher

    encoders = {}
    return {name: Searcher.open(str(folder), encoders) for name, folder in indexes.items()}


@pytest.fixture(scope="module")
def service(searchers):
    with serving(searchers) as url:
        yield url


@pytest.fixture(scope="module")
def clip_client_module():
    path = anchor("clip_retrieval") / "clip_retrieval" / "clip_client.py"
    spec = importlib.util.spec_from_file_location("anchor_clip_client", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def client(module, url, **options):
    options = {"indice_name": "syn", "num_images": 10, "deduplicate": False, **options}
    return module.ClipClient(url=f"{url}/knn-service", **options)


def stored_image(searcher, i) -> bytes:
    stored = searcher.folder.metadata
    with tarfile.open(stored.columns["shard"][i]) as tar:
        return tar.extractfile(next(m for m in tar if m.name.startswith(stored.keys[i] + "."))).read()


def expected(hits):
    return [(hit.id, hit.score, hit.caption) for hit in hits]


def answered(results):
    return [(r["id"], r["similarity"], r["caption"]) for r in results]


# ---------------------------------------------------------------- the caption index


def test_a_text_modality_build_indexes_every_caption_under_its_image_id(searchers):
    from eval.index.search import reconstruct

    searcher = searchers["syn"]
    folder = searcher.folder
    assert folder.info["modalities"] == ["image", "text"] and folder.text_index.ntotal == NUM_ITEMS
    assert searchers["plain"].folder.text_index is None and searchers["plain"].folder.modalities == ("image",)
    captions = folder.metadata.captions
    stored = reconstruct(folder.text_index, list(range(NUM_ITEMS)))
    fresh = searcher.encoder.encode_texts(captions)
    assert np.allclose(np.sum(stored * fresh, axis=1), 1.0, atol=1e-4)     # row i is caption i's embedding
    text_info = folder.info["text_index"]
    assert text_info["tuning"]["query_source"] == "image embeddings (image->caption)"
    assert text_info["count"] == NUM_ITEMS and text_info["held_out"]["num_queries"] > 0


def test_index_search_by_caption_finds_that_caption_first(searchers):
    searcher = searchers["syn"]
    caption = searcher.folder.metadata.captions[11]
    top = searcher.search_texts([caption], 3, modality="text")[0][0]
    assert top.caption == caption and top.score > 0.999


# ---------------------------------------------------------------- ClipClient, unmodified


def test_clip_client_text_query_gets_the_same_hits_as_the_searcher(service, searchers, clip_client_module):
    results = client(clip_client_module, service).query(text="a red circle")
    assert answered(results) == expected(searchers["syn"].search_texts(["a red circle"], 10)[0])
    first = results[0]
    assert base64.b64decode(first["image"]) == stored_image(searchers["syn"], first["id"])
    assert first["key"] == searchers["syn"].folder.metadata.keys[first["id"]]
    assert not {"shard", "image_offset", "image_size"} & set(first)     # where the bytes sit stays private


def test_clip_client_image_file_query(service, searchers, clip_client_module, tmp_path):
    searcher = searchers["syn"]
    path = tmp_path / "query.jpg"
    path.write_bytes(stored_image(searcher, 7))
    results = client(clip_client_module, service, num_images=5).query(image=str(path))
    tensor = searcher.encoder.prepare_image(path.read_bytes())
    assert answered(results) == expected(searcher.search_images([tensor], 5)[0])
    assert results[0]["id"] == 7 and results[0]["similarity"] > 0.99


def test_clip_client_embedding_query_equals_the_text_query(service, searchers, clip_client_module):
    vector = searchers["syn"].encoder.encode_texts(["a blue star"])[0]
    by_vector = client(clip_client_module, service).query(embedding_input=vector.tolist())
    by_text = client(clip_client_module, service).query(text="a blue star")
    assert [r["id"] for r in by_vector] == [r["id"] for r in by_text]
    assert np.allclose([r["similarity"] for r in by_vector], [r["similarity"] for r in by_text], atol=1e-5)


def test_clip_client_text_modality_searches_the_captions(service, searchers, clip_client_module):
    results = client(clip_client_module, service, modality=clip_client_module.Modality.TEXT).query(
        text="a green square")
    assert answered(results) == expected(searchers["syn"].search_texts(["a green square"], 10, modality="text")[0])


def test_unhonoured_options_are_named_in_a_header_and_counted_in_health(service, clip_client_module):
    before = requests.get(f"{service}/health").json()["not_applied"]
    body = {"text": "a red circle", "image": None, "image_url": None, "embedding_input": None,
            "deduplicate": False, "use_safety_model": True, "use_violence_detector": True, "indice_name": "syn",
            "use_mclip": False, "aesthetic_score": 9, "aesthetic_weight": 0.5, "modality": "image",
            "num_images": 3, "num_result_ids": 3}      # what ClipClient sends by default
    response = requests.post(f"{service}/knn-service", data=json.dumps(body))
    assert response.status_code == 200
    assert response.headers["x-mmssl-not-applied"] == "use_safety_model, use_violence_detector, aesthetic_score"
    after = requests.get(f"{service}/health").json()
    assert after["not_applied"]["aesthetic_score"] == before.get("aesthetic_score", 0) + 1
    assert set(after["unsupported_options"]) == {"use_safety_model", "use_violence_detector", "use_mclip",
                                                 "aesthetic_score"}
    quiet = dict(body, use_safety_model=False, use_violence_detector=False, aesthetic_score="")
    assert "x-mmssl-not-applied" not in requests.post(f"{service}/knn-service", data=json.dumps(quiet)).headers


# ---------------------------------------------------------------- the answer's shape


def knn(url, **fields):
    body = {"modality": "image", "num_images": 10, "indice_name": "syn", **fields}
    return requests.post(f"{url}/knn-service", data=json.dumps(body))


def test_only_the_first_num_images_carry_metadata(service):
    results = knn(service, text="a red circle", num_images=3, num_result_ids=12).json()
    assert len(results) == 12
    assert all({"caption", "image", "key"} <= set(r) for r in results[:3])
    assert all(set(r) == {"id", "similarity"} for r in results[3:])
    assert [r["similarity"] for r in results] == sorted((r["similarity"] for r in results), reverse=True)


def test_metadata_route_completes_results_like_the_front_does(service):
    results = knn(service, text="a red circle", num_images=2, num_result_ids=8).json()
    ids = [r["id"] for r in results[2:]]
    response = requests.post(f"{service}/metadata", data=json.dumps({"ids": ids, "indice_name": "syn"}))
    full = knn(service, text="a red circle", num_images=8, num_result_ids=8).json()
    assert response.status_code == 200
    assert response.json() == [{"id": r["id"], "metadata": {k: v for k, v in r.items() if k not in ("id", "similarity")}}
                               for r in full[2:]]
    bad = requests.post(f"{service}/metadata", data=json.dumps({"ids": [NUM_ITEMS], "indice_name": "syn"}))
    assert bad.status_code == 400 and bad.json()["error"] == f"id {NUM_ITEMS} is not in index 'syn' (ids are 0..39)"


def test_deduplicate_drops_near_duplicates_of_better_ranked_results(service, searchers):
    from eval.index.search import reconstruct

    results = knn(service, text="a red circle", num_result_ids=NUM_ITEMS, deduplicate=True).json()
    hits = searchers["syn"].search_texts(["a red circle"], NUM_ITEMS)[0]
    vectors = reconstruct(searchers["syn"].folder.index, [hit.id for hit in hits])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    kept = [hit.id for j, hit in enumerate(hits)
            if not any(float(vectors[i] @ vectors[j]) >= 0.94 for i in range(j))]
    assert [r["id"] for r in results] == kept
    assert 0 < len(kept) < NUM_ITEMS       # a random-init model maps many scenes close together


def test_near_duplicates_compares_each_row_with_every_better_ranked_row():
    from eval.index.search import near_duplicates

    a, b = np.eye(3, dtype=np.float32)[:2]
    c = np.array([0.96, 0.28, 0], dtype=np.float32)      # cos(a, c) = 0.96, cos(b, c) = 0.28
    rows = np.stack([a, b, a * 2, c, b + 0.01 * a])
    assert near_duplicates(rows, 0.94).tolist() == [False, False, True, True, True]
    many = np.repeat(a[None], 1200, axis=0)              # more rows than one comparison block
    assert near_duplicates(many, 0.94).tolist() == [False] + [True] * 1199


def test_indices_list_and_config_for_the_front(service):
    assert requests.get(f"{service}/indices-list").json() == ["syn", "plain"]
    assert requests.get(f"{service}/config.json").json() == {"defaultBackend": service, "defaultIndex": "syn",
                                                             "urlColumn": "url"}


def test_search_and_image_routes_take_the_index_name(service, searchers):
    hits = requests.post(f"{service}/search", json={"text": "a red circle", "k": 2, "index": "plain"}).json()
    top = hits["results"][0]
    assert top["image_url"].endswith("?index=plain")
    image = requests.get(f"{service}{top['image_url']}")
    assert image.status_code == 200
    assert image.content == stored_image(searchers["plain"], searchers["plain"].folder.metadata.key_to_id[top["key"]])


# ---------------------------------------------------------------- errors are JSON, never HTML


@pytest.mark.parametrize("fields, status, message", [
    ({"text": "x", "indice_name": "laion5B"}, 400, "unknown index 'laion5B'; this service has: syn, plain"),
    ({"text": "x", "indice_name": "plain", "modality": "text"}, 400,
     "index 'plain' has no caption index for modality 'text'; build it with `mmssl index build --modality image,text`"),
    ({"image_url": "http://127.0.0.1:9/a.jpg"}, 400,
     "this service does not fetch image URLs (start it with --allow-image-urls); send the image itself as base64 in 'image'"),
    ({"embedding_input": [0.1, 0.2]}, 400, "embedding_input has 2 numbers; index 'syn' holds 128-d vectors"),
    ({"embedding_input": [0.0] * 128}, 400, "embedding_input must be finite and not all zeros"),
    ({"text": "a red circle", "image": "aGVsbG8="}, 400,
     "give exactly one of text, image, image_url or embedding_input (got text, image)"),
    ({"text": None}, 400, "give exactly one of text, image, image_url or embedding_input (got none)"),
    ({"text": "x", "num_result_ids": 10_001}, 400, "num_result_ids must be an integer in 1..10000"),
    ({"text": "x", "modality": "audio"}, 400,
     "modality must be 'image' (search the images) or 'text' (search the captions)"),
    ({"text": "x", "deduplicate": "yes"}, 400, "deduplicate must be true, false or null"),
    ({"image": "not base64!"}, 400, "image is not valid base64"),
    ({"embedding_input": ["0.1"] * 128}, 400, "embedding_input must be a non-empty list of numbers"),
    ({"text": "x", "indice_name": 7}, 400, "indice_name must be the name of a served index (GET /indices-list)"),
    ({"text": "x", "aesthetic_score": "nine"}, 400, 'aesthetic_score must be a number, a numeric string, "" or null'),
    ({"text": "x", "num_images": True}, 400, "num_images must be an integer in 1..1000"),
    ({"text": "x" * 1001}, 400, "text is 1001 characters; the limit is 1000 (--max-text-chars)"),
])
def test_bad_knn_requests_get_a_json_400_naming_the_problem(service, fields, status, message):
    response = knn(service, **fields)
    assert response.status_code == status and response.json() == {"error": message}


def test_clip_client_sees_a_json_error_for_an_unknown_index(service, clip_client_module):
    answer = client(clip_client_module, service, indice_name="laion5B").query(text="a cat")   # no JSONDecodeError
    assert answer == {"error": "unknown index 'laion5B'; this service has: syn, plain"}


def test_nan_in_an_embedding_is_refused(service):
    body = '{"embedding_input": [NaN' + ", 0.1" * 127 + '], "indice_name": "syn"}'    # Python's json reads NaN
    response = requests.post(f"{service}/knn-service", data=body)
    assert response.status_code == 400 and response.json() == {"error": "embedding_input must be finite and not all zeros"}


@pytest.mark.parametrize("body, message", [
    ({"ids": "0,1"}, "ids must be a list of integer ids"),
    ({"ids": [True]}, "ids must be a list of integer ids"),
    ({"ids": list(range(1001))}, "at most 1000 ids per request, got 1001"),
    ({"ids": [-1]}, f"id -1 is not in index 'syn' (ids are 0..{NUM_ITEMS - 1})"),
    ({"ids": [0], "indice_name": "nope"}, "unknown index 'nope'; this service has: syn, plain"),
])
def test_bad_metadata_requests_get_a_json_400(service, body, message):
    response = requests.post(f"{service}/metadata", data=json.dumps(body))
    assert response.status_code == 400 and response.json() == {"error": message}


def test_a_knn_body_over_the_limit_is_refused_before_it_is_read_whole(searchers):
    with serving(searchers, max_body_bytes=4096) as url:
        response = requests.post(f"{url}/knn-service", data=json.dumps({"text": "x", "image": "A" * 10_000}))
        assert response.status_code == 413 and response.json() == {"error": "request body over 4096 bytes"}
        assert knn(url, text="a red circle").status_code == 200          # still serving


def test_a_non_json_body_is_a_json_error(service):
    response = requests.post(f"{service}/knn-service", data=b"<html>")
    assert response.status_code == 400 and response.json() == {"error": "body is not valid JSON"}


# ---------------------------------------------------------------- image_url, when switched on


class _ImageHost(http.server.BaseHTTPRequestHandler):
    image = b""

    def do_GET(self):
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd")
            self.end_headers()
            return
        body = self.image if self.path == "/query.jpg" else b"\xff" * (3 * 2**20)
        self.send_response(200 if self.path in ("/query.jpg", "/huge") else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_image_urls_are_fetched_only_when_allowed_and_within_limits(searchers):
    searcher = searchers["syn"]
    _ImageHost.image = stored_image(searcher, 5)
    with http_server(_ImageHost) as host, serving(searchers, allow_image_urls=True,
                                                  max_body_bytes=2 * 2**20) as url:
        found = knn(url, image_url=f"{host}/query.jpg", num_images=3).json()
        by_upload = knn(url, image=base64.b64encode(_ImageHost.image).decode(), num_images=3).json()
        assert [r["id"] for r in found] == [r["id"] for r in by_upload] and found[0]["id"] == 5
        redirected = knn(url, image_url=f"{host}/redirect")
        assert redirected.status_code == 400 and "redirects are not followed" in redirected.json()["error"]
        huge = knn(url, image_url=f"{host}/huge")
        assert huge.status_code == 413 and huge.json()["error"] == f"image_url body is {3 * 2**20} bytes, over {2 * 2**20}"
        missing = knn(url, image_url=f"{host}/nothing.jpg")
        assert missing.status_code == 400 and missing.json()["error"] == "image_url answered HTTP 404"
        scheme = knn(url, image_url="file:///etc/passwd")
        assert scheme.status_code == 400 and "http:// or https://" in scheme.json()["error"]


# ---------------------------------------------------------------- clip-retrieval's web front


PROBE = """<!doctype html><html><body>
<iframe id="front" src="index.html?back={back}&index=syn&query=red%20circle" width="1200" height="900"></iframe>
<pre id="out">waiting</pre>
<script>
function probe() {{
  try {{
    const element = document.getElementById("front").contentDocument.querySelector("clip-front");
    const root = element && element.shadowRoot;
    const pictures = root ? [...root.querySelectorAll("img.pic")] : [];
    document.getElementById("out").textContent = JSON.stringify({{
      pictures: pictures.length,
      rendered: pictures.filter(p => p.complete && p.naturalWidth > 0).length,
      inline: pictures.filter(p => p.getAttribute("src").startsWith("data:image/")).length,
      captions: root ? [...root.querySelectorAll("figcaption")].map(c => c.textContent.trim()) : []}});
  }} catch (error) {{ document.getElementById("out").textContent = "error " + error; }}
  setTimeout(probe, 250);
}}
probe();
</script></body></html>"""


@pytest.mark.skipif(shutil.which(CHROMIUM) is None,
                    reason="Debian's chromium is not installed (apt-get install -y chromium)")
def test_clip_retrievals_web_front_shows_result_images_from_another_origin(searchers, tmp_path):
    front = tmp_path / "front"
    shutil.copytree(anchor("clip_retrieval") / "front" / "build", front)     # the wheel's files, unchanged
    with http_server(directory=front) as front_url:
        with serving(searchers, cors_origins=(front_url,)) as back:
            (front / "probe.html").write_text(PROBE.format(back=back))
            command = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                       "--virtual-time-budget=15000", "--dump-dom", f"{front_url}/probe.html"]
            dom = subprocess.run(command, capture_output=True, text=True, timeout=120).stdout
            # what the front asks by default: 40 images of 3000 ids, duplicates hidden
            wanted = knn(back, text="red circle", num_images=40, num_result_ids=3000, deduplicate=True).json()
    seen = json.loads(dom.split('<pre id="out">', 1)[1].split("</pre>", 1)[0])
    assert seen["pictures"] == len(wanted) >= 1
    assert seen["rendered"] == seen["inline"] == seen["pictures"]      # every result image decoded and shown
    assert seen["captions"] == [result["caption"] for result in wanted]


# ---------------------------------------------------------------- command line and folder checks


def test_index_flags_name_the_served_indexes(tmp_path):
    from eval.serve import index_specs
    from mmssl.errors import UserError

    odd = tmp_path / "with=sign"
    odd.mkdir()
    assert index_specs(["laion=/data/a", str(tmp_path / "b/")]) == {"laion": "/data/a", "b": str(tmp_path / "b/")}
    assert index_specs([str(odd)]) == {"with=sign": str(odd)}          # a folder whose name holds '='
    with pytest.raises(UserError, match="the name 'a' is given twice"):
        index_specs(["a=/x", "a=/y"])


def test_text_modality_from_embeddings_needs_the_caption_vectors(tmp_path, capsys):
    from helpers import exit_code

    vectors = tmp_path / "img.npy"
    np.save(vectors, np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32))
    np.save(tmp_path / "short.npy", np.ones((49, 8), dtype=np.float32))
    argv = ["index", "build", "--embeddings", str(vectors), "--out", str(tmp_path / "idx"), "--modality", "image,text"]
    assert exit_code(argv) == 2
    assert "needs --text-embeddings" in capsys.readouterr().err
    assert exit_code(argv + ["--text-embeddings", str(tmp_path / "short.npy")]) == 2
    assert "row i of both must describe item i" in capsys.readouterr().err
    np.save(tmp_path / "txt.npy", np.random.default_rng(1).standard_normal((50, 8)).astype(np.float32))
    assert exit_code(argv + ["--text-embeddings", str(tmp_path / "txt.npy")]) == 0
    info = json.loads((tmp_path / "idx" / "index_info.json").read_text())
    assert info["modalities"] == ["image", "text"] and "text_index.faiss" in info["files"]


def test_a_folder_claiming_a_caption_index_it_lacks_is_refused(indexes, tmp_path):
    from eval.index.store import load_index_folder
    from mmssl.errors import UserError

    copy = tmp_path / "copy"
    shutil.copytree(indexes["plain"], copy)
    info = json.loads((copy / "index_info.json").read_text())
    (copy / "index_info.json").write_text(json.dumps({**info, "modalities": ["image", "text"]}))
    with pytest.raises(UserError, match="no size and sha256 recorded for text_index.faiss"):
        load_index_folder(copy)
    (copy / "index_info.json").write_text(json.dumps({**info, "modalities": ["text", "audio"]}))
    with pytest.raises(UserError, match="'modalities' must list 'image', then optionally 'text'"):
        load_index_folder(copy)


def test_index_search_command_searches_the_captions(indexes, searchers, capsys):
    from helpers import exit_code

    caption = searchers["syn"].folder.metadata.captions[3]
    assert exit_code(["index", "search", "--index", str(indexes["syn"]), "--text", caption, "-k", "2",
                      "--modality", "text"]) == 0
    first = capsys.readouterr().out.splitlines()[1]
    assert first.split(None, 3)[3] == caption and float(first.split()[1]) > 0.999
    assert exit_code(["index", "search", "--index", str(indexes["plain"]), "--text", "x", "--modality", "text"]) == 2
    assert "holds no text index" in capsys.readouterr().err
