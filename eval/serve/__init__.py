"""`mmssl serve`: an HTTP search service over one or more index folders (FastAPI on uvicorn).

    POST /search      {"text": "..."} or {"image": "<base64>"}, optional "k" (1..1000, default 10),
                      optional "index" (a served index's name; default the first)
                      -> {"results": [{"rank", "key", "caption", "score", "image_url"}], "took_ms"}
    GET  /image/{key} the stored image bytes (JPEG/PNG/WebP as stored in the shard); ?index=NAME
    GET  /health      status, index size, version and type, queries served, text-cache hit rate, per index
    POST /reload      load the index folders again and swap them in without dropping requests
                      (loopback clients only unless --allow-remote-reload; SIGHUP does the same)
    GET  /            a small search page (no external scripts)
    clip-retrieval's back end: POST /knn-service, POST /metadata, GET /indices-list, GET /config.json

Modules: `app` (routes and error answers), `service` (the served indexes and the path every query
takes), `clip_retrieval` (clip-retrieval's protocol), `batching` (the query worker and its
supervisor), `requests` (reading and validating a search request), `image_urls` (fetching an
image URL query, off by default), `options` (every limit, with its default), `hosts` (Host header
check against DNS rebinding), `cors` (CORS, off by default), `page` (the web page). Query images are admitted by `mmssl.data.image_guard`; stored images are served by
`eval.index.stored_images`, only from the roots recorded at build time. docs/serve.md has the
limits, the status codes and the trust model.

Throughput design: every query is handed to one worker thread that drains whatever queries are
waiting, embeds them in one batched forward pass per kind and searches FAISS once for the batch.
On a CPU this beats running requests in parallel (which only splits the same cores between
forward passes) and keeps latency flat under concurrency; the event loop only parses JSON and
writes responses. Bad requests get a 4xx JSON `{"error": ...}`; nothing a client sends can stop
the worker, and the work in flight is bounded (queue, body bytes, image decodes, timeouts).
"""
from __future__ import annotations

import argparse
import os

MAX_BATCH = 32


def register(subparsers) -> None:
    from eval.serve.options import ServeOptions

    defaults = ServeOptions()
    limits = defaults.image_limits
    parser = subparsers.add_parser("serve", help="serve an index over HTTP (search API and web page)")
    parser.add_argument("--index", required=True, action="append", metavar="[NAME=]DIR",
                        help="index folder made by `mmssl index build`, served as NAME (default: the folder's "
                             "name); repeatable, the first is the default index")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed at start)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch / faiss threads for queries (default: the machine's cores less one, 1 to 4)")
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH, help="most queries embedded in one pass")
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue,
                        help=f"queries waiting for the worker before new ones get 503 (default {defaults.max_queue})")
    parser.add_argument("--request-timeout", type=float, default=defaults.request_timeout,
                        help=f"seconds to answer a query before 504 (default {defaults.request_timeout:g})")
    parser.add_argument("--body-timeout", type=float, default=defaults.body_timeout,
                        help=f"seconds to receive a request body before 408 (default {defaults.body_timeout:g})")
    parser.add_argument("--max-text-chars", type=int, default=defaults.max_text_chars,
                        help=f"longest text query (default {defaults.max_text_chars})")
    parser.add_argument("--max-image-side", type=int, default=limits.max_side,
                        help=f"largest query image side in pixels (default {limits.max_side})")
    parser.add_argument("--max-image-pixels", type=int, default=limits.max_pixels,
                        help=f"most query image pixels (default {limits.max_pixels})")
    parser.add_argument("--max-image-aspect", type=float, default=limits.max_aspect,
                        help=f"largest long-to-short side ratio of a query image (default {limits.max_aspect:g})")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="another name the Host header may carry (repeatable; *.example.com for subdomains)")
    parser.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="an origin whose pages may call the API (repeatable; CORS is off without it)")
    parser.add_argument("--allow-image-urls", action="store_true",
                        help="fetch the image named by a /knn-service image_url (off: the service would be an "
                             "open proxy; see docs/serve.md)")
    parser.add_argument("--image-url-timeout", type=float, default=defaults.image_url_timeout,
                        help=f"seconds to fetch one image URL (default {defaults.image_url_timeout:g})")
    parser.add_argument("--rerank", choices=("itm",), help="reorder text queries' top candidates by the index "
                                                         "model's image-text matching head (a request's rerank_k "
                                                         "says how many; 0: none)")
    parser.add_argument("--rerank-k", type=int, default=defaults.rerank_k,
                        help=f"candidates re-ranked when a request does not say (default {defaults.rerank_k})")
    parser.add_argument("--allow-remote-reload", action="store_true",
                        help="answer POST /reload from any client, not only loopback ones (see docs/serve.md)")
    parser.set_defaults(func=run_serve)


def serve_options(args: argparse.Namespace):
    """ServeOptions from the flags; UserError for a value out of range."""
    from mmssl.data.image_guard import ImageLimits
    from eval.serve.options import ServeOptions
    from mmssl.errors import require

    require(args.max_batch >= 1 and args.max_queue >= 1, "--max-batch and --max-queue must be >= 1")
    require(args.request_timeout > 0 and args.body_timeout > 0, "--request-timeout and --body-timeout must be > 0")
    require(args.max_text_chars >= 1, "--max-text-chars must be >= 1")
    require(args.image_url_timeout > 0, "--image-url-timeout must be > 0")
    from eval.index.rerank import MAX_RERANK_K

    require(1 <= args.rerank_k <= MAX_RERANK_K, f"--rerank-k must be in 1..{MAX_RERANK_K}")
    limits = ImageLimits(args.max_image_side, args.max_image_pixels, args.max_image_aspect)
    return ServeOptions(bind_host=args.host, allowed_hosts=tuple(args.allowed_host),
                        cors_origins=tuple(args.cors_origin), max_batch=args.max_batch, max_queue=args.max_queue,
                        request_timeout=args.request_timeout, body_timeout=args.body_timeout,
                        max_text_chars=args.max_text_chars, image_limits=limits,
                        allow_image_urls=args.allow_image_urls, image_url_timeout=args.image_url_timeout,
                        rerank=args.rerank, rerank_k=args.rerank_k,
                        allow_remote_reload=getattr(args, "allow_remote_reload", False))


def run_serve(args: argparse.Namespace) -> int:
    import sys

    from mmssl.errors import require

    require(0 <= args.port <= 65535, f"--port must be in 0..65535, got {args.port}")
    require(args.threads >= 0, "--threads must be >= 0")
    import dataclasses

    options = dataclasses.replace(serve_options(args), reload_on_sighup=True)   # SIGHUP reloads the folders
    specs = index_specs(args.index)
    # torch and faiss each bring an OpenMP pool; idle spinning in one starves the other
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import uvicorn

    from eval.index.search import Searcher
    from eval.serve.app import create_app

    sock = _bind(args.host, args.port)  # first: a taken port fails before seconds of model loading
    try:
        configure_threads(args.threads)
        encoders = {}       # indexes built with the same model share its query encoder
        searchers = {name: Searcher.open(folder, encoders) for name, folder in specs.items()}
        app = create_app(searchers, options)
        for served in app.state.service.indexes.values():
            if not served.images.enabled:
                sys.stderr.write(f"mmssl serve: index {served.name!r} records no image roots (built before they "
                                 "were recorded): its images are not served; rebuild it to serve them\n")
        host, port = sock.getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        served = ", ".join(f"{name}={searcher.folder.path} ({searcher.folder.info['count']} items, "
                           f"{'+'.join(searcher.folder.modalities)})" for name, searcher in searchers.items())
        print(f"serving {served} on http://{host}:{port}", flush=True)
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0


def index_specs(values: list[str]) -> dict:
    """{name: folder} from `--index [NAME=]DIR` values; UserError for an empty or repeated name."""
    from pathlib import Path

    from mmssl.errors import UserError

    specs = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or "/" in name or Path(value).exists():   # a bare DIR (a path may hold '=')
            name, folder = Path(value).resolve().name, value
        if not name or not folder:
            raise UserError(f"--index {value!r}: expected NAME=DIR or DIR")
        if name in specs:
            raise UserError(f"--index: the name {name!r} is given twice; name them NAME=DIR")
        specs[name] = folder
    return specs


def _bind(host: str, port: int):
    import socket

    from mmssl.errors import UserError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say so, and without it a
    # response written as headers + body waits ~40 ms for the client's delayed ACK (Nagle)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
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

    # one core is left to the event loop, body reads and image decoding: OpenMP threads that must
    # share cores with them stall at every barrier, most of all while the service is under attack
    threads = threads or max(1, min(4, (os.cpu_count() or 1) - 1))
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
