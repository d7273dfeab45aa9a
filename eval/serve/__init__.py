"""`mmssl serve`: an HTTP search service over an index folder (FastAPI on uvicorn).

    POST /search      {"text": "..."} or {"image": "<base64>"}, optional "k" (1..1000, default 10)
                      -> {"results": [{"rank", "key", "caption", "score", "image_url"}], "took_ms"}
    GET  /image/{key} the stored image bytes (JPEG/PNG/WebP as stored in the shard)
    GET  /health      status, index size and type, queries served, text-cache hit rate
    GET  /            a small search page (no external scripts)

Modules: `app` (routes), `batching` (the query worker), `requests` (parsing and validating a
search request), `page` (the web page).

Throughput design: every query is handed to one worker thread that drains whatever queries are
waiting, embeds them in one batched forward pass per kind and searches FAISS once for the batch.
On a CPU this beats running requests in parallel (which only splits the same cores between
forward passes) and keeps latency flat under concurrency; the event loop only parses JSON and
writes responses. Bad requests get a 4xx JSON `{"error": ...}`; nothing a client sends can stop
the worker.
"""
from __future__ import annotations

import argparse
import os

MAX_BATCH = 32


def register(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="serve an index over HTTP (search API and web page)")
    parser.add_argument("--index", required=True, help="index folder made by `mmssl index build`")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed at start)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch / faiss threads for queries (default: the machine's cores, at most 4)")
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH, help="most queries embedded in one pass")
    parser.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from mmssl.errors import require

    require(0 <= args.port <= 65535, f"--port must be in 0..65535, got {args.port}")
    require(args.threads >= 0 and args.max_batch >= 1, "--threads must be >= 0 and --max-batch >= 1")
    # torch and faiss each bring an OpenMP pool; idle spinning in one starves the other
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import uvicorn

    from eval.index.search import Searcher
    from eval.serve.app import create_app

    sock = _bind(args.host, args.port)  # first: a taken port fails before seconds of model loading
    try:
        configure_threads(args.threads)
        searcher = Searcher.open(args.index)
        app = create_app(searcher, max_batch=args.max_batch)
        host, port = sock.getsockname()[:2]
        print(f"serving {searcher.folder.path} ({searcher.folder.info['count']} items) on http://{host}:{port}",
              flush=True)
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0


def _bind(host: str, port: int):
    import socket

    from mmssl.errors import UserError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def configure_threads(threads: int) -> None:
    import faiss
    import torch

    threads = threads or min(4, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
