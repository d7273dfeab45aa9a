"""`mmssl serve` under hostile input: image admission (format, sides, pixels, aspect, bounded
memory), text length and a byte-bounded text cache, the batching worker (cancelled and vanished
requests, crashes, a full queue, timeouts), slow bodies, images served only from the recorded
roots, Host / CORS / Content-Type checks, and JSON errors everywhere. Loopback only."""
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import serving
from mmssl.cli import main

NUM_ITEMS = 24
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- fixtures and helpers

# index_dir (NUM_ITEMS val images), searcher, server and client are fixtures in conftest.py;
# serving(searcher, **options) runs the app with other options


class GatedSearcher:
    """The real searcher, except that a text starting with "block" waits for `release`, a text
    starting with "kill" ends the worker thread (SystemExit), and every embedded text is recorded."""

    def __init__(self, real):
        self.real, self.folder, self.encoder = real, real.folder, real.encoder
        self.entered, self.release = threading.Event(), threading.Event()
        self.seen: list[str] = []

    def search_texts(self, texts, k, modality="image"):
        self.seen.extend(texts)
        if any(text.startswith(("block", "kill")) for text in texts):
            self.entered.set()
            assert self.release.wait(30)
        if any(text.startswith("kill") for text in texts):
            raise SystemExit("simulated worker death")
        return self.real.search_texts(texts, k, modality)

    def search_images(self, images, k, modality="image"):
        return self.real.search_images(images, k, modality)


def _post(url, text, k=3, timeout=30):
    return httpx.post(f"{url}/search", json={"text": text, "k": k}, timeout=timeout)


def _wait_until(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def _health(url):
    return httpx.get(f"{url}/health", timeout=10)


def _png(width, height, mode="RGB", colour=0) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), colour).save(buffer, "PNG")
    return buffer.getvalue()


def _encoded(fmt, size=(32, 32), **save) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ---------------------------------------------------------------- image admission

def test_thin_images_and_pixel_bombs_are_refused_before_any_decoding_with_bounded_memory():
    """A 1000x1 PNG grows to ~150 MB in the shortest-side resize of a 224-px query transform; a
    9500x9500 PNG (a few KiB) decodes to 270 MB. Both must be refused from the header: the peak RSS
    of a fresh process handling them (admission, then the resize the transform would do) grows by
    well under 50 MB. (Without the admission the same script grows by ~110 and ~240 MB.)"""
    script = r"""
import io, json, resource
from PIL import Image
from mmssl.data.image_guard import ImageLimits, ImageRefused, admit_image

def png(w, h, mode="RGB"):
    buffer = io.BytesIO(); Image.new(mode, (w, h)).save(buffer, "PNG"); return buffer.getvalue()

def transform(image, side=224):      # what the query transform's Resize(224) does to a PIL image
    scale = side / min(image.size)
    return image.resize((max(side, round(image.width * scale)), max(side, round(image.height * scale))),
                        Image.BICUBIC)

corpus = {"thin_1000x1": png(1000, 1), "thin_3000x1": png(3000, 1), "tall_1x2000": png(1, 2000),
          "bomb_9500": png(9500, 9500, "1")}
transform(admit_image(png(300, 200), ImageLimits(), 224))       # warm up the normal path
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = {"bytes": {name: len(data) for name, data in corpus.items()}}
for name, data in corpus.items():
    try:
        transform(admit_image(data, ImageLimits(), 224))
        out[name] = [200, ""]
    except ImageRefused as err:
        out[name] = [err.status, str(err)]
out["peak_growth_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out["bytes"]["bomb_9500"] < 20_000 and out["bytes"]["thin_1000x1"] < 200
    assert out["thin_1000x1"][0] == 413 and "aspect ratio 1000:1 over the 20:1 limit" in out["thin_1000x1"][1]
    assert out["thin_3000x1"][0] == 413 and "--max-image-aspect" in out["thin_3000x1"][1]
    assert out["tall_1x2000"][0] == 413
    assert out["bomb_9500"][0] == 413 and "9500x9500" in out["bomb_9500"][1]
    assert "over 4096 px (--max-image-side)" in out["bomb_9500"][1]
    assert out["peak_growth_kib"] < 50 * 1024, out


def test_each_limit_is_named_and_configurable():
    from mmssl.data.image_guard import ImageLimits, ImageRefused, admit_image

    assert admit_image(_png(200, 50), ImageLimits()).size == (200, 50)
    with pytest.raises(ImageRefused) as side:
        admit_image(_png(200, 50), ImageLimits(max_side=100))
    assert side.value.status == 413 and "image is 200x50: a side over 100 px (--max-image-side)" in str(side.value)
    with pytest.raises(ImageRefused) as pixels:
        admit_image(_png(1100, 1000), ImageLimits(max_pixels=1_000_000))
    assert pixels.value.status == 413
    assert "1100x1000 = 1.1 Mpx, over the 1 Mpx limit (--max-image-pixels)" in str(pixels.value)
    with pytest.raises(ImageRefused) as aspect:
        admit_image(_png(90, 10), ImageLimits(max_aspect=8))
    assert aspect.value.status == 413 and "aspect ratio 9:1 over the 8:1 limit" in str(aspect.value)
    assert admit_image(_png(80, 10), ImageLimits(max_aspect=8)).size == (80, 10)


@pytest.mark.parametrize("name, data", [
    ("bmp", _encoded("BMP")),
    ("tiff", _encoded("TIFF")),
    ("ico", _encoded("ICO")),
    ("ppm", _encoded("PPM")),
    ("svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>'),
    ("text", b"this is not an image at all"),
    ("empty", b""),
])
def test_only_jpeg_png_webp_and_gif_are_admitted(name, data):
    from mmssl.data.image_guard import ImageLimits, ImageRefused, admit_image

    with pytest.raises(ImageRefused) as refused:
        admit_image(data, ImageLimits())
    assert refused.value.status == 400
    assert "not a JPEG, PNG, WebP or GIF image" in str(refused.value)


def test_truncated_images_are_400():
    from mmssl.data.image_guard import ImageLimits, ImageRefused, admit_image

    for fmt in ("JPEG", "PNG"):
        whole = _encoded(fmt, (128, 128))
        assert admit_image(whole, ImageLimits()).size == (128, 128)
        with pytest.raises(ImageRefused) as refused:
            admit_image(whole[: len(whole) // 2], ImageLimits())
        assert refused.value.status == 400 and "truncated or corrupt" in str(refused.value)


def test_webp_and_the_first_frame_of_a_gif_are_admitted():
    from mmssl.data.image_guard import ImageLimits, admit_image

    assert admit_image(_encoded("WEBP", (40, 30)), ImageLimits()).size == (40, 30)
    frames = [Image.new("RGB", (20, 10), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50)
    image = admit_image(buffer.getvalue(), ImageLimits())
    assert image.mode == "RGB" and image.size == (20, 10)
    assert image.getpixel((5, 5)) == (255, 0, 0)


def test_a_large_jpeg_is_decoded_at_reduced_scale_for_a_small_model():
    from mmssl.data.image_guard import ImageLimits, admit_image

    jpeg = _encoded("JPEG", (2048, 1536), quality=70)
    assert admit_image(jpeg, ImageLimits(), target_size=64).size == (256, 192)     # DCT scale 1/8
    assert admit_image(jpeg, ImageLimits(), target_size=224).size == (512, 384)    # 1/4 still >= 224
    assert admit_image(jpeg, ImageLimits()).size == (2048, 1536)
    assert admit_image(_encoded("PNG", (512, 256)), ImageLimits(), target_size=64).size == (512, 256)


def test_the_service_refuses_bad_images_and_still_answers_good_ones(client):
    thin = client.post("/search", json={"image": _b64(_png(1000, 1))})
    assert thin.status_code == 413 and "aspect ratio 1000:1" in thin.json()["error"]
    bomb = client.post("/search", json={"image": _b64(_png(9500, 9500, "1"))})
    assert bomb.status_code == 413 and "9500x9500" in bomb.json()["error"]
    bmp = client.post("/search", json={"image": _b64(_encoded("BMP"))})
    assert bmp.status_code == 400 and "not a JPEG, PNG, WebP or GIF image" in bmp.json()["error"]
    truncated = _encoded("JPEG", (128, 128))
    cut = client.post("/search", json={"image": _b64(truncated[:len(truncated) // 2])})
    assert cut.status_code == 400 and "truncated or corrupt" in cut.json()["error"]
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (255, 0, 0)).save(buffer, "GIF")
    gif = client.post("/search", json={"image": _b64(buffer.getvalue()), "k": 4})
    assert gif.status_code == 200 and len(gif.json()["results"]) == 4


def test_the_service_image_limits_follow_its_options(searcher):
    from mmssl.data.image_guard import ImageLimits

    with serving(searcher, image_limits=ImageLimits(max_side=50)) as url:
        too_big = httpx.post(f"{url}/search", json={"image": _b64(_png(60, 60))})
        assert too_big.status_code == 413 and "a side over 50 px" in too_big.json()["error"]
        assert httpx.post(f"{url}/search", json={"image": _b64(_png(50, 50))}).status_code == 200


def test_index_search_uses_the_same_admission(index_dir, tmp_path, capsys):
    (tmp_path / "thin.png").write_bytes(_png(1000, 1))
    (tmp_path / "pic.bmp").write_bytes(_encoded("BMP"))
    assert main(["index", "search", "--index", str(index_dir), "--image", str(tmp_path / "thin.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "thin.png" in err and "aspect ratio 1000:1 over the 20:1 limit" in err
    assert main(["index", "search", "--index", str(index_dir), "--image", str(tmp_path / "pic.bmp")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a JPEG, PNG, WebP or GIF image" in err
    assert main(["index", "search", "--index", str(index_dir), "--text", "x" * 1001]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1001 characters; the limit is 1000" in err


# ---------------------------------------------------------------- text length and the text cache

def test_text_length_is_capped_with_a_clear_400(client):
    started = time.perf_counter()
    huge = client.post("/search", json={"text": "a red circle " * 400_000})     # 5.2 MB of text
    assert huge.status_code == 400 and time.perf_counter() - started < 3        # today: 200 after seconds
    assert "text query's text is limited to 1000 characters (--max-text-chars)" in huge.json()["error"]
    over = client.post("/search", json={"text": "a" * 1001})
    assert over.status_code == 400
    assert over.json()["error"] == "text is 1001 characters; the limit is 1000 (--max-text-chars)"
    assert client.post("/search", json={"text": "a" * 1000, "k": 2}).status_code == 200
    # the cheap size screen never refuses an admissible text, however it is escaped
    for text in ("\u00e9" * 1000, "\U0001F600" * 1000):
        escaped = json.dumps({"text": text, "k": 2}).encode()
        response = client.post("/search", content=escaped, headers={"content-type": "application/json"})
        assert response.status_code == 200 and len(escaped) > 6000


def test_the_text_limit_follows_the_options(searcher):
    with serving(searcher, max_text_chars=20) as url:
        refused = _post(url, "a red circle on the left")
        assert refused.status_code == 400 and "24 characters; the limit is 20" in refused.json()["error"]
        assert _post(url, "a red circle").status_code == 200


def test_the_text_cache_is_bounded_in_bytes(searcher):
    from eval.index.query import QueryEncoder

    encoder = QueryEncoder(searcher.encoder.loaded, cache_size=10_000, cache_bytes=64 * 1024)
    texts = [f"query {i} " + "x" * 600 for i in range(120)]
    for start in range(0, len(texts), 40):
        encoder.encode_texts(texts[start:start + 40])
    entries = list(encoder._cache.items())
    assert 0 < len(entries) < len(texts)
    accounted = sum(sys.getsizeof(text) + vector.nbytes for text, vector in entries)
    assert encoder.cache_bytes_used == accounted <= 64 * 1024
    assert [text for text, _ in entries] == texts[-len(entries):]         # least recently used went first
    assert all(vector.base is None for _, vector in entries)              # own copies, not views of a batch
    counted = QueryEncoder(searcher.encoder.loaded, cache_size=5)
    counted.encode_texts(texts[:12])
    assert len(counted._cache) == 5


# ---------------------------------------------------------------- the batching worker

def test_a_cancelled_request_is_skipped_and_does_not_kill_the_worker(searcher):
    from eval.serve.batching import QueryBatcher

    gated = GatedSearcher(searcher)
    batcher = QueryBatcher(gated, max_batch=8)
    batcher.start()
    try:
        blocker = batcher.submit("text", "block a red circle", 3)
        assert gated.entered.wait(10)
        victim = batcher.submit("text", "a blue star", 3)
        assert victim.cancel()
        gated.release.set()
        assert len(blocker.result(10)) == 3
        after = batcher.submit("text", "a green square", 2)
        assert len(after.result(10)) == 2          # today's worker died on the cancelled future
        assert "a blue star" not in gated.seen     # dropped before any model work
        assert batcher.skipped_cancelled == 1 and batcher.restarts == 0
    finally:
        batcher.stop()


def test_a_dead_worker_is_restarted_waiting_requests_get_503_and_health_tells_the_truth(searcher):
    gated = GatedSearcher(searcher)
    with serving(gated, restart_delay=1.5) as url, ThreadPoolExecutor(4) as pool:
        doomed = pool.submit(_post, url, "kill the worker")
        assert gated.entered.wait(10)
        waiting = pool.submit(_post, url, "a red circle")
        assert _wait_until(lambda: _health(url).json()["queue_depth"] == 1)
        gated.release.set()
        for response in (doomed.result(10), waiting.result(10)):
            assert response.status_code == 503 and response.headers["retry-after"] == "1"
            assert "query worker stopped" in response.json()["error"]
        down = _health(url)
        assert down.status_code == 503 and down.json()["status"] == "unhealthy"
        assert "SystemExit" in down.json()["error"]
        assert _wait_until(lambda: _health(url).status_code == 200)
        health = _health(url).json()
        assert health["status"] == "ok" and health["worker_restarts"] == 1
        assert _post(url, "a blue star", k=2).status_code == 200


def test_one_failing_batch_fails_only_its_requests(searcher):
    class Failing(GatedSearcher):
        def search_texts(self, texts, k, modality="image"):
            if any("explode" in text for text in texts):
                raise RuntimeError("boom")
            return super().search_texts(texts, k, modality)

    with serving(Failing(searcher)) as url:
        failed = _post(url, "explode")
        assert failed.status_code == 500 and failed.json() == {"error": "internal error: RuntimeError"}
        assert _post(url, "a red circle").status_code == 200
        assert _health(url).json()["worker_restarts"] == 0


def test_a_full_queue_answers_503_with_retry_after(searcher):
    gated = GatedSearcher(searcher)
    with serving(gated, max_queue=2) as url, ThreadPoolExecutor(4) as pool:
        first = pool.submit(_post, url, "block")
        assert gated.entered.wait(10)
        queued = [pool.submit(_post, url, f"a red circle {i}") for i in range(2)]
        assert _wait_until(lambda: _health(url).json()["queue_depth"] == 2)
        refused = _post(url, "one too many")
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "queue is full (2 waiting)" in refused.json()["error"]
        gated.release.set()
        assert [f.result(10).status_code for f in [first, *queued]] == [200, 200, 200]


def test_a_request_times_out_with_504_and_a_queued_one_is_dropped(searcher):
    gated = GatedSearcher(searcher)
    with serving(gated, request_timeout=0.5) as url, ThreadPoolExecutor(2) as pool:
        blocked = pool.submit(_post, url, "block")
        assert gated.entered.wait(10)
        started = time.perf_counter()
        queued = _post(url, "a queued query")
        assert queued.status_code == 504 and 0.4 < time.perf_counter() - started < 5
        assert queued.json()["error"] == "no answer within 0.5 s (--request-timeout)"
        assert blocked.result(10).status_code == 504
        gated.release.set()
        assert _post(url, "a red circle").status_code == 200
        assert "a queued query" not in gated.seen
        assert _health(url).json()["skipped_cancelled"] == 1


def _send_raw(url, data: bytes) -> socket.socket:
    host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
    sock = socket.create_connection((host.strip("[]"), int(port)), timeout=10)
    sock.sendall(data)
    return sock


def _raw_request(body: bytes, host="127.0.0.1", content_length=None) -> bytes:
    length = len(body) if content_length is None else content_length
    return (f"POST /search HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode() + body


def test_a_request_whose_client_has_gone_is_dropped_before_embedding(searcher):
    gated = GatedSearcher(searcher)
    with serving(gated) as url, ThreadPoolExecutor(2) as pool:
        blocked = pool.submit(_post, url, "block")
        assert gated.entered.wait(10)
        sock = _send_raw(url, _raw_request(json.dumps({"text": "gone away", "k": 3}).encode()))
        assert _wait_until(lambda: _health(url).json()["queue_depth"] == 1)
        sock.close()
        assert _wait_until(lambda: _health(url).json()["clients_gone"] == 1)
        gated.release.set()
        assert blocked.result(10).status_code == 200
        assert _post(url, "a red circle").status_code == 200
        assert "gone away" not in gated.seen
        assert _health(url).json()["skipped_cancelled"] == 1


def test_a_slow_body_gets_408_and_does_not_hold_the_worker(searcher):
    with serving(searcher, body_timeout=0.6) as url:
        started = time.perf_counter()
        sock = _send_raw(url, _raw_request(b'{"text": "a re', content_length=40))
        assert _post(url, "a red circle").status_code == 200          # served meanwhile
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        sock.close()
        elapsed = time.perf_counter() - started
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower()
        assert json.loads(body) == {"error": "request body not received within 0.6 s"}
        assert 0.5 < elapsed < 5


def test_answers_do_not_wait_for_delayed_acks(server):
    """Without TCP_NODELAY a response written as headers + body waits ~40 ms for the client's
    delayed ACK: every request took >= 40 ms on loopback."""
    with httpx.Client(base_url=server, timeout=10) as http:
        http.get("/health")
        took = []
        for _ in range(15):
            started = time.perf_counter()
            assert http.get("/health").status_code == 200
            took.append(time.perf_counter() - started)
    assert sorted(took)[len(took) // 2] < 0.02, took


# ---------------------------------------------------------------- images only from the recorded roots

def _embeddings_index(tmp_path, paths, image_roots=(), name="index"):
    np.save(tmp_path / "emb.npy", np.random.default_rng(0).standard_normal((len(paths), 8)).astype(np.float32))
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(len(paths))], "caption": ["c"] * len(paths),
                             "image_path": [str(p) for p in paths]}), tmp_path / "meta.parquet")
    argv = ["index", "build", "--embeddings", str(tmp_path / "emb.npy"), "--metadata", str(tmp_path / "meta.parquet"),
            "--out", str(tmp_path / name)]
    for root in image_roots:
        argv += ["--image-root", str(root)]
    return main(argv), tmp_path / name


def _open_folder(path):
    from eval.index.search import Searcher
    from eval.index.store import load_index_folder

    return Searcher(load_index_folder(path), None)


def _rewrite_metadata(index, column, row, value):
    """Change one cell of metadata.parquet the way an attacker who controls the folder would: the
    file sizes and checksums recorded in index_info.json are updated to match."""
    import hashlib

    table = pq.read_table(index / "metadata.parquet")
    values = table.column(column).to_pylist()
    values[row] = value
    table = table.set_column(table.column_names.index(column), column, pa.array(values, table.schema.field(column).type))
    pq.write_table(table, index / "metadata.parquet")
    info = json.loads((index / "index_info.json").read_text())
    if "files" in info:
        data = (index / "metadata.parquet").read_bytes()
        info["files"]["metadata.parquet"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (index / "index_info.json").write_text(json.dumps(info))


def test_image_paths_outside_the_image_roots_are_refused_at_build(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(_png(8, 8))
    code, _ = _embeddings_index(tmp_path, [images / "a.png", "/etc/passwd"], image_roots=[images])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "row 1 (key 'k1')" in err and "/etc/passwd" in err
    assert "outside the image roots" in err and "--image-root" in err


def test_only_files_under_the_recorded_roots_are_served(tmp_path, capsys):
    images, outside = tmp_path / "images", tmp_path / "elsewhere"
    images.mkdir()
    outside.mkdir()
    (images / "a.png").write_bytes(_png(8, 8, colour=(255, 0, 0)))
    (images / "b.jpg").write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")       # not an image
    (outside / "secret.png").write_bytes(_png(8, 8))
    (images / "link.png").symlink_to(outside / "secret.png")                    # escapes the root
    relative = Path(os.path.relpath(images / "a.png", tmp_path))                 # resolved against the parquet
    code, index = _embeddings_index(tmp_path, [images / "a.png", images / "b.jpg", images / "link.png", relative],
                                    image_roots=[images])
    assert code == 0, capsys.readouterr().err
    info = json.loads((index / "index_info.json").read_text())
    assert info["image_roots"] == [str(images.resolve())]
    with serving(_open_folder(index)) as url:
        assert httpx.get(f"{url}/image/k0").content == (images / "a.png").read_bytes()
        assert httpx.get(f"{url}/image/k3").content == (images / "a.png").read_bytes()
        for key in ("k1", "k2"):
            refused = httpx.get(f"{url}/image/{key}")
            assert refused.status_code == 404 and "no servable image" in refused.json()["error"]

    _rewrite_metadata(index, "image_path", 0, "/etc/passwd")           # a tampered index folder
    from eval.serve.app import create_app
    from mmssl.errors import UserError

    with pytest.raises(UserError, match=r"row 0 \(key 'k0'\).*/etc/passwd.*outside the image roots"):
        create_app(_open_folder(index))
    capsys.readouterr()
    assert main(["serve", "--index", str(index), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "row 0 (key 'k0')" in err


def test_a_recorded_root_that_is_a_system_folder_is_refused(tmp_path):
    from eval.serve.app import create_app
    from mmssl.errors import UserError

    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(_png(8, 8))
    code, index = _embeddings_index(tmp_path, [images / "a.png"], image_roots=[images])
    assert code == 0
    info = json.loads((index / "index_info.json").read_text())
    for root in ("/", "/etc"):
        (index / "index_info.json").write_text(json.dumps({**info, "image_roots": [root]}))
        with pytest.raises(UserError, match="image root .* is a system folder"):
            create_app(_open_folder(index))


def test_shard_images_are_served_only_when_the_tar_header_names_them(index_dir, tmp_path, searcher):
    import shutil

    index = tmp_path / "index"
    shutil.copytree(index_dir, index)
    metadata = searcher.folder.metadata
    shard, offset = metadata.columns["shard"][0], metadata.columns["image_offset"][0]
    info = json.loads((index / "index_info.json").read_text())
    assert info["image_roots"] == [str(Path(shard).parent)]
    with tarfile.open(shard) as tar:
        members = {member.name: member for member in tar}
    text_member = members[f"{metadata.keys[0]}.txt"]
    other_jpg = members[f"{metadata.keys[1]}.jpg"]
    _rewrite_metadata(index, "image_offset", 0, offset + 512)                 # shifted by one block
    _rewrite_metadata(index, "image_offset", 1, text_member.offset_data)       # another member of a sample
    _rewrite_metadata(index, "image_size", 1, text_member.size)
    _rewrite_metadata(index, "image_offset", 2, other_jpg.offset_data)         # another key's image
    with serving(_open_folder(index)) as url:
        for key in metadata.keys[:3]:
            refused = httpx.get(f"{url}/image/{key}")
            assert refused.status_code == 404 and "no servable image" in refused.json()["error"]
        served = httpx.get(f"{url}/image/{metadata.keys[3]}")
        assert served.status_code == 200 and served.content[:3] == b"\xff\xd8\xff"

    _rewrite_metadata(index, "shard", 5, "/etc/passwd")
    from eval.serve.app import create_app
    from mmssl.errors import UserError

    with pytest.raises(UserError, match=rf"row 5 \(key '{metadata.keys[5]}'\).*outside the image roots"):
        create_app(_open_folder(index))


def test_an_index_that_records_no_roots_serves_no_images(index_dir, tmp_path):
    import shutil

    index = tmp_path / "index"
    shutil.copytree(index_dir, index)
    info = json.loads((index / "index_info.json").read_text())
    del info["image_roots"]
    (index / "index_info.json").write_text(json.dumps(info))
    with serving(_open_folder(index)) as url:
        key = _open_folder(index).folder.metadata.keys[0]
        assert httpx.get(f"{url}/image/{key}").status_code == 404


# ---------------------------------------------------------------- Host, CORS and Content-Type

@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonx"])
def test_search_requires_a_json_content_type(client, content_type):
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/search", content=b'{"text": "a red circle"}', headers=headers)
    assert response.status_code == 415
    assert response.json()["error"] == "Content-Type must be application/json"


def test_json_with_a_charset_is_accepted(client):
    response = client.post("/search", content=b'{"text": "a red circle", "k": 2}',
                           headers={"content-type": "application/json; charset=utf-8"})
    assert response.status_code == 200 and len(response.json()["results"]) == 2


@pytest.mark.parametrize("host, status", [
    ("127.0.0.1", 200), ("127.0.0.1:9", 200), ("localhost:8000", 200), ("LOCALHOST", 200), ("[::1]:8000", 200),
    ("evil.example", 421), ("evil.example:8000", 421), ("127.0.0.1.evil.example", 421), ("10.0.0.5", 421),
])
def test_the_host_header_must_name_the_bound_address(client, host, status):
    response = client.get("/health", headers={"host": host})
    assert response.status_code == status
    if status != 200:
        assert response.json()["error"].startswith(f"Host {host!r} is not allowed")


def test_allowed_hosts_extend_the_bound_address(searcher):
    with serving(searcher, allowed_hosts=("search.example", "*.corp.example")) as url:
        for host, status in (("search.example", 200), ("a.corp.example:80", 200), ("corp.example", 421),
                             ("127.0.0.1", 200), ("other.example", 421)):
            assert httpx.get(f"{url}/health", headers={"host": host}).status_code == status, host


def test_host_rules_for_wildcard_and_named_binds():
    from eval.serve.hosts import HostPolicy

    wildcard = HostPolicy.for_bind("0.0.0.0")
    assert all(wildcard.allows(h) for h in ("10.1.2.3:8000", "[fe80::1]:80", "localhost", "127.0.0.1"))
    assert not any(wildcard.allows(h) for h in ("evil.example", "10.1.2.3.nip.io", "", None))
    assert HostPolicy.for_bind("::").allows("[2001:db8::1]")
    loopback = HostPolicy.for_bind("::1")
    assert loopback.allows("[::1]:8000") and loopback.allows("localhost") and not loopback.allows("10.0.0.1")
    named = HostPolicy.for_bind("192.168.1.5", ("search.lan",))
    assert named.allows("192.168.1.5:8000") and named.allows("search.lan") and not named.allows("localhost")


def test_cors_is_off_by_default(client):
    response = client.get("/health", headers={"origin": "http://evil.example"})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
    preflight = client.options("/search", headers={"origin": "http://evil.example",
                                                   "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    assert preflight.status_code == 405 and "error" in preflight.json()


def test_cors_origins_are_allowed_only_when_given(searcher):
    with serving(searcher, cors_origins=("http://app.example",)) as url:
        simple = httpx.post(f"{url}/search", json={"text": "a red circle", "k": 1},
                            headers={"origin": "http://app.example"})
        assert simple.status_code == 200 and simple.headers["access-control-allow-origin"] == "http://app.example"
        preflight = httpx.options(f"{url}/search", headers={"origin": "http://app.example",
                                                            "access-control-request-method": "POST",
                                                            "access-control-request-headers": "content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://app.example"
        other = httpx.get(f"{url}/health", headers={"origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        refused = httpx.options(f"{url}/search", headers={"origin": "http://evil.example",
                                                          "access-control-request-method": "POST"})
        assert refused.status_code == 400 and "error" in refused.json()


# ---------------------------------------------------------------- every error is JSON, and serving goes on

def test_every_error_is_json_and_the_server_keeps_serving(client):
    big = b'{"image": "' + b"A" * (11 * 2**20) + b'"}'
    cases = [
        (client.get("/no-such-route"), 404),
        (client.get("/search"), 405),
        (client.post("/search", content=b"{}", headers={"content-type": "text/plain"}), 415),
        (client.post("/search", content=big, headers={"content-type": "application/json"}), 413),
        (client.post("/search", json={"text": "x" * 5000}), 400),
        (client.post("/search", json={"image": _b64(_png(1000, 1))}), 413),
        (client.get("/health", headers={"host": "evil.example"}), 421),
        (client.get("/image/not-a-key"), 404),
    ]
    for response, status in cases:
        assert response.status_code == status, response.text[:200]
        assert response.headers["content-type"] == "application/json"
        assert isinstance(response.json()["error"], str) and response.json()["error"]
    assert client.get("/health").json()["status"] == "ok"
    assert len(client.post("/search", json={"text": "a blue star", "k": 3}).json()["results"]) == 3
