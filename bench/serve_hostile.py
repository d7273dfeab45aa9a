"""`mmssl serve` under hostile input: valid queries keep their latency while attackers send bombs.

One `mmssl serve` subprocess on loopback over an index built like bench/serve_load.py's (its
helpers are imported, not copied). First, valid clients (text and image queries at a steady
`--valid-rate`) run on a quiet server: their p99 is the anchor, measured in the same run. Then the
same valid clients run while an attacker process (one thread per kind, each paced at
`--attack-rate` attempts per second) sends the bomb corpus:

    thin_png 1000x1 PNG (83 bytes)            bomb_png 9500x9500 PNG (~11 KiB)
    huge_png 5000x5000 PNG (over 16 Mpx)      large_jpeg 3000x3000 JPEG (admitted, draft-decoded)
    truncated_jpeg / bmp / tiff / svg_text    text_10mb 10 MB of text
    bad_json / wrong_content_type / bad_host  cancelled (send a query, close at once)
    slow_body (a few bytes per second)        slow_headers (headers never finished; we close)

Reported: valid-query errors (target 0), the valid p99 under attack against the quiet one
(target < 2x), the server's RSS growth during the attack (psutil; target < 300 MB), hangs (any
request without an answer within its client timeout; target 0), and per attack kind the answers
received (and the server's busy cores per phase). Every loop stops by itself at its deadline. Pacing the attackers keeps this a test of
hostile *content* (what a service must survive by itself); a volumetric flood is a proxy's job.
Prints one JSON object.

    python bench/serve_hostile.py [--duration 120] [--quick] [--items 20000] [--clients 4] [--valid-rate 20]
                                  [--attack-rate 5] [--attacks KIND,KIND,...]
"""
from __future__ import annotations

import argparse
import base64
import importlib.util
import io
import json
import multiprocessing
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
# run as `python bench/serve_hostile.py`, this folder heads sys.path and bench/eval.py would shadow `eval`
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
_spec = importlib.util.spec_from_file_location("serve_load", HERE / "serve_load.py")
serve_load = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve_load)

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

CLIENT_TIMEOUT = 60.0      # a valid or attacking request without an answer by then is a hang
IMAGE_SHARE = 0.2          # of the valid queries
EXPECTED = {               # what each attack kind should get back
    "thin_png": "413", "bomb_png": "413", "huge_png": "413", "large_jpeg": "200", "truncated_jpeg": "400",
    "bmp": "400", "tiff": "400", "svg_text": "400", "text_10mb": "400", "bad_json": "400",
    "wrong_content_type": "415", "bad_host": "421", "cancelled": "closed by us", "slow_body": "408",
    "slow_headers": "closed by us",
}


# ---------------------------------------------------------------- the corpus

def _encode(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def valid_images(count: int = 40) -> list[str]:
    """base64 JPEGs of coloured shapes, like the queries a user would send."""
    rng = random.Random(0)
    out = []
    for _ in range(count):
        image = Image.new("RGB", (96, 96), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        x, y, r = rng.randrange(20, 76), rng.randrange(20, 76), rng.randrange(8, 20)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
        out.append(base64.b64encode(_encode(image, "JPEG", quality=90)).decode())
    return out


def bomb_bodies() -> dict[str, bytes]:
    """Attack kind -> the JSON body it posts (application/json unless the kind says otherwise)."""
    def image_body(data: bytes) -> bytes:
        return json.dumps({"image": base64.b64encode(data).decode(), "k": 10}).encode()

    jpeg = _encode(_noise(256, 256), "JPEG", quality=90)
    return {
        "thin_png": image_body(_encode(Image.new("RGB", (1000, 1)), "PNG")),
        "bomb_png": image_body(_encode(Image.new("1", (9500, 9500)), "PNG")),
        "huge_png": image_body(_encode(Image.new("RGB", (5000, 5000)), "PNG")),
        "large_jpeg": image_body(_encode(_noise(60, 60, 1).resize((3000, 3000), Image.BILINEAR), "JPEG", quality=85)),
        "truncated_jpeg": image_body(jpeg[: len(jpeg) // 2]),
        "bmp": image_body(_encode(_noise(64, 64), "BMP")),
        "tiff": image_body(_encode(_noise(64, 64), "TIFF")),
        "svg_text": image_body(b'<svg xmlns="http://www.w3.org/2000/svg" width="9999" height="9999"/>'),
        "text_10mb": json.dumps({"text": "a red circle " * 769_230}).encode(),
        "bad_json": b'{"text": "a red circle", k: 10',
        "wrong_content_type": b'{"text": "a red circle"}',
        "bad_host": b'{"text": "a red circle"}',
    }


# ---------------------------------------------------------------- clients

class ValidClients:
    """Clients sending text (and some image) queries at a steady total `rate` until their deadline.

    Paced rather than back to back: clients that saturate the CPU would make the p99 measure only
    how much CPU an attack takes away, not how the service treats the queries it is given."""

    def __init__(self, url: str, clients: int, rate: float, images: list[str]):
        self.url, self.clients, self.images = url, clients, images
        self.interval = clients / rate
        self.pool = serve_load.query_pool()

    def run(self, seconds: float, seed: int) -> dict:
        """One phase; each phase gets its own seed, so that no phase replays another's queries
        (the server's text cache would answer them)."""
        latencies, errors, hangs = [], [], [0]
        lock = threading.Lock()
        deadline = time.perf_counter() + seconds

        def client(number: int) -> None:
            rng = random.Random(seed * 1000 + number)
            mine, failed, hung = [], [], 0
            next_at = time.perf_counter() + self.interval * number / self.clients
            with httpx.Client(base_url=self.url, timeout=CLIENT_TIMEOUT) as http:
                while True:
                    time.sleep(max(0.0, next_at - time.perf_counter()))
                    next_at = max(next_at, time.perf_counter()) + self.interval
                    if time.perf_counter() >= deadline:
                        break
                    k = rng.choice(serve_load.K_CHOICES)
                    body = {"image": rng.choice(self.images)} if rng.random() < IMAGE_SHARE else \
                        {"text": rng.choice(self.pool)}
                    started = time.perf_counter()
                    try:
                        response = http.post("/search", json={**body, "k": k})
                        ok = response.status_code == 200 and len(response.json()["results"]) == k
                        outcome = str(response.status_code)
                    except httpx.TimeoutException:
                        ok, outcome, hung = False, "hang", hung + 1
                    except httpx.HTTPError as err:
                        ok, outcome = False, type(err).__name__
                    mine.append(time.perf_counter() - started)
                    if not ok:
                        failed.append(outcome)
            with lock:
                latencies.extend(mine)
                errors.extend(failed)
                hangs[0] += hung

        threads = [threading.Thread(target=client, args=(i,)) for i in range(self.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        ms = np.array(latencies) * 1000
        return {"requests": len(latencies), "qps": round(len(latencies) / seconds, 1),
                "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
                "max_ms": round(float(ms.max()), 1), "errors": len(errors), "hangs": hangs[0],
                "error_samples": dict(Counter(errors).most_common(5))}


class Attackers:
    """One paced thread per attack kind; records what each attempt got back."""

    def __init__(self, url: str, rate: float, body_timeout: float, kinds=None):
        self.url, self.rate, self.body_timeout = url, rate, body_timeout
        self.kinds = set(kinds or EXPECTED)
        self.host, self.port = url.rsplit("//", 1)[1].rsplit(":", 1)
        self.port = int(self.port)
        self.bodies = {kind: body for kind, body in bomb_bodies().items() if kind in self.kinds}
        self.outcomes: dict[str, Counter] = {}
        self.hangs = 0
        self._lock = threading.Lock()

    def _record(self, kind: str, outcome: str) -> None:
        with self._lock:
            self.outcomes.setdefault(kind, Counter())[outcome] += 1
            self.hangs += outcome == "hang"

    def _http_attack(self, kind: str, deadline: float) -> None:
        body = self.bodies[kind]
        headers = {"content-type": "text/plain" if kind == "wrong_content_type" else "application/json"}
        if kind == "bad_host":
            headers["host"] = "evil.example"
        with httpx.Client(base_url=self.url, timeout=CLIENT_TIMEOUT) as http:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    self._record(kind, str(http.post("/search", content=body, headers=headers).status_code))
                except httpx.TimeoutException:
                    self._record(kind, "hang")
                except httpx.HTTPError as err:
                    self._record(kind, type(err).__name__)
                time.sleep(max(0.0, 1 / self.rate - (time.perf_counter() - started)))

    def _raw(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=CLIENT_TIMEOUT)
        sock.settimeout(CLIENT_TIMEOUT)
        return sock

    def _head(self, length: int) -> bytes:
        return (f"POST /search HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {length}\r\n\r\n").encode()

    def _cancelled(self, deadline: float) -> None:
        body = json.dumps({"text": "a large red circle on the left", "k": 50}).encode()
        while time.perf_counter() < deadline:
            sock = self._raw()
            sock.sendall(self._head(len(body)) + body)
            sock.close()
            self._record("cancelled", "closed by us")
            time.sleep(1 / self.rate)

    def _slow_body(self, deadline: float) -> None:
        """Declares 1000 bytes, sends 2 a second: the server must answer 408 after its body timeout."""
        while time.perf_counter() < deadline:
            sock = self._raw()
            sock.sendall(self._head(1000) + b'{"text": "')
            sock.setblocking(False)
            outcome = None
            give_up = time.perf_counter() + CLIENT_TIMEOUT
            while outcome is None:
                try:
                    data = sock.recv(4096)
                    outcome = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "closed"
                except BlockingIOError:
                    if time.perf_counter() > give_up:
                        outcome = "hang"
                        break
                    try:
                        sock.send(b"aa")
                    except OSError:
                        outcome = "closed"
                    time.sleep(1.0)
                except OSError as err:
                    outcome = type(err).__name__
            sock.close()
            self._record("slow_body", outcome)

    def _slow_headers(self, deadline: float) -> None:
        """Never finishes its headers; closes after 10 s (uvicorn has no header timeout)."""
        while time.perf_counter() < deadline:
            sock = self._raw()
            sock.sendall(b"POST /search HTTP/1.1\r\nHost: ")
            until = min(deadline, time.perf_counter() + 10)
            while time.perf_counter() < until:
                try:
                    sock.send(b"x")
                except OSError:
                    break
                time.sleep(1.0)
            sock.close()
            self._record("slow_headers", "closed by us")

    def run(self, seconds: float, slow_sockets: int = 4) -> None:
        deadline = time.perf_counter() + seconds
        targets = [(self._http_attack, kind) for kind in self.bodies]
        targets += [(self._cancelled, None)] if "cancelled" in self.kinds else []
        targets += [(self._slow_body, None)] * slow_sockets if "slow_body" in self.kinds else []
        targets += [(self._slow_headers, None)] * slow_sockets if "slow_headers" in self.kinds else []
        threads = [threading.Thread(target=fn, args=(kind, deadline) if kind else (deadline,)) for fn, kind in targets]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


def attack_process(url: str, rate: float, body_timeout: float, kinds, seconds: float, ready, go, results) -> None:
    """The attackers in their own process, so that their work does not hold the GIL of the process
    that times the valid clients, and at the lowest CPU priority: on a network the attackers' own
    work runs on their machines, here it shares the server's cores. Builds the corpus, says
    `ready`, waits for `go`, attacks."""
    os.nice(19)
    attackers = Attackers(url, rate, body_timeout, kinds)
    ready.set()
    go.wait()
    attackers.run(seconds)
    results.put({"outcomes": {kind: dict(counts) for kind, counts in attackers.outcomes.items()},
                 "hangs": attackers.hangs})


# ---------------------------------------------------------------- the run

def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def _cores_busy(process: psutil.Process, started: float, cpu_started: float) -> float:
    return round((_cpu_seconds(process) - cpu_started) / (time.perf_counter() - started), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of the attack phase")
    parser.add_argument("--quiet-duration", type=float, default=20.0, help="seconds of the quiet anchor")
    parser.add_argument("--quick", action="store_true", help="a ~20 s check: 6 s quiet, 14 s under attack")
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=128, help="the model's embedding size")
    parser.add_argument("--clients", type=int, default=4, help="valid clients")
    parser.add_argument("--valid-rate", type=float, default=20.0, help="valid queries per second, all clients")
    parser.add_argument("--attack-rate", type=float, default=5.0, help="attempts per second per attack kind")
    parser.add_argument("--attacks", help="comma-separated attack kinds to run (default: all)")
    parser.add_argument("--threads", type=int, default=0, help="server --threads (0: its default)")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.quiet_duration = 14.0, 6.0
    kinds = args.attacks.split(",") if args.attacks else list(EXPECTED)
    unknown = sorted(set(kinds) - set(EXPECTED))
    if unknown:
        parser.error(f"unknown attack kind(s) {', '.join(unknown)}; known: {', '.join(EXPECTED)}")
    body_timeout = min(10.0, args.duration / 4)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        embeddings, metadata = serve_load.write_collection(work, args.items, args.dim)
        subprocess.run([sys.executable, "-m", "mmssl", "index", "build", "--embeddings", str(embeddings),
                        "--metadata", str(metadata), "--checkpoint", serve_load.MODEL, "--out", str(work / "index")],
                       check=True, capture_output=True)
        attacker = None
        server, url = serve_load.start_server(work / "index", args.threads,
                                              ["--body-timeout", f"{body_timeout:g}"], log=work / "server.log")
        try:
            process = psutil.Process(server.pid)
            context = multiprocessing.get_context("spawn")
            ready, go, results = context.Event(), context.Event(), context.Queue()
            attacker = context.Process(target=attack_process, args=(url, args.attack_rate, body_timeout, kinds,
                                                                     args.duration, ready, go, results))
            attacker.start()
            valid = ValidClients(url, args.clients, args.valid_rate, valid_images())
            valid.run(3.0, seed=1)                             # warm-up: allocator, caches, first batches
            if not ready.wait(120):
                raise RuntimeError("the attacker process did not start")
            started, cpu_started = time.perf_counter(), _cpu_seconds(process)
            quiet = valid.run(args.quiet_duration, seed=2)
            quiet["server_cores_busy"] = _cores_busy(process, started, cpu_started)
            rss_start = process.memory_info().rss
            samples, stop = [], threading.Event()

            def sample_rss() -> None:
                while not stop.wait(0.5):
                    samples.append(process.memory_info().rss)

            sampler = threading.Thread(target=sample_rss)
            sampler.start()
            go.set()
            time.sleep(0.5)                                     # the attackers are at work first
            started, cpu_started = time.perf_counter(), _cpu_seconds(process)
            attacked = valid.run(args.duration - 0.5, seed=3)
            attacked["server_cores_busy"] = _cores_busy(process, started, cpu_started)
            attack = results.get(timeout=CLIENT_TIMEOUT + 30)
            attacker.join(timeout=30)
            stop.set()
            sampler.join()
            rss_end = process.memory_info().rss
            health = httpx.get(f"{url}/health", timeout=10)
            after = httpx.post(f"{url}/search", json={"text": "a red circle", "k": 5}, timeout=10)
            served_after = after.status_code == 200 and len(after.json()["results"]) == 5
        finally:
            if attacker is not None and attacker.is_alive():
                attacker.terminate()
            server.terminate()
            server.wait(timeout=30)
            log_tail = (work / "server.log").read_text()[-2000:]

    mib = 2**20
    growth = (max(samples + [rss_end]) - rss_start) / mib
    ratio = attacked["p99_ms"] / quiet["p99_ms"]
    hangs = quiet["hangs"] + attacked["hangs"] + attack["hangs"]
    print(json.dumps({
        "bench": "serve_hostile", "quick": args.quick, "items": args.items, "model": serve_load.MODEL,
        "cpu_count": os.cpu_count(), "valid_clients": args.clients, "valid_rate": args.valid_rate,
        "image_query_share": IMAGE_SHARE,
        "attack_rate_per_kind": args.attack_rate, "attack_kinds": len(kinds), "server_body_timeout_s": body_timeout,
        "quiet": quiet, "under_attack": attacked,
        "p99_under_attack_vs_quiet": round(ratio, 2),
        "valid_errors": quiet["errors"] + attacked["errors"],
        "hangs": hangs,
        "server_rss_mib": {"attack_start": round(rss_start / mib, 1), "max": round(max(samples + [rss_end]) / mib, 1),
                           "end": round(rss_end / mib, 1), "growth": round(growth, 1)},
        "attacks": {kind: dict(sorted(counts.items())) for kind, counts in sorted(attack["outcomes"].items())},
        "attack_answers_not_expected": {kind: sum(n for outcome, n in counts.items() if outcome != EXPECTED[kind])
                                        for kind, counts in sorted(attack["outcomes"].items())},
        "after": {"health_status": health.status_code, "health": health.json(), "valid_query_ok": served_after},
        "targets": {"valid_errors": 0, "p99_ratio_below": 2.0, "rss_growth_mib_below": 300, "hangs": 0},
        "met": {"valid_errors": quiet["errors"] + attacked["errors"] == 0, "p99_ratio": ratio < 2.0,
                "rss_growth": growth < 300, "hangs": hangs == 0},
        "server_log_tail": log_tail,
    }, indent=2))


if __name__ == "__main__":
    main()
