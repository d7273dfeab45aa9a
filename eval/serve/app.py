"""The FastAPI application: routes, JSON errors, the limits of `ServeOptions`, stored images.

Every answer to a bad or unlucky request is a 4xx/5xx JSON `{"error": ...}`:
400 bad query or unknown index, 404 unknown key / route or no servable image, 405 wrong method,
408 body too slow, 413 body or image over a limit, 415 not JSON, 421 Host not allowed, 499 client
went away (never seen by it), 500 a failure while answering, 503 queue full / body budget spent /
worker restarting (with Retry-After), 504 no answer within the request timeout. `/health`
answers 503 while a query worker is down or stuck. clip-retrieval's routes (`/knn-service`,
`/metadata`, `/indices-list`, `/config.json`) come from `eval.serve.clip_retrieval`.

`POST /reload` (and SIGHUP under `mmssl serve`) loads the index folders again and swaps them in
(`Service.reload`): 200 with what changed, 403 for a client that is not loopback (unless
`allow_remote_reload`) or a browser (an Origin header), 409 while another reload runs, 422/500 when
a folder does not load (the old version keeps serving).
"""
from __future__ import annotations

import asyncio
import ipaddress
import signal
import sys
import time
from contextlib import asynccontextmanager
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from eval.serve.batching import QueueFull, WorkerUnavailable
from eval.serve.clip_retrieval import add_clip_retrieval_routes
from eval.serve.cors import JSONCORSMiddleware, cors_options
from eval.serve.hosts import HostCheckMiddleware, HostPolicy
from eval.serve.options import ServeOptions
from eval.serve.page import PAGE
from eval.serve.requests import RETRY, BadRequest, parse_search_request, require_json_content_type
from eval.serve.service import ClientGone, ReloadBusy, ReloadFailed, Service

MAX_K = 1000


def create_app(searchers, options: ServeOptions | None = None):
    """The FastAPI app for one `Searcher` or a {name: Searcher} dict (the first is the default
    index); the batching workers start and stop with the app. UserError when an index's rows name
    images outside its recorded roots."""
    options = options or ServeOptions()
    if not isinstance(searchers, dict):
        searchers = {searchers.folder.path.name: searchers}
    service = Service(searchers, options)

    async def reload() -> dict:
        answer = await service.reload()
        app.state.images, app.state.batcher = service.default.images, service.default.batcher
        return answer

    async def reload_on_signal() -> None:
        try:
            answer = await reload()
        except (ReloadBusy, ReloadFailed) as err:
            sys.stderr.write(f"mmssl serve: SIGHUP: {err}\n")
            return
        for name, change in answer.items():
            sys.stderr.write(f"mmssl serve: reloaded {name}: {change['old_count']} -> {change['new_count']} items, "
                             f"version {change['new_version']}, in {change['took_ms']:.0f} ms\n")

    def install_sighup() -> bool:
        """Install the SIGHUP handler (POSIX, main thread only); it runs on the loop, so the reload
        is awaited like a request's. Whether it was installed."""
        if not (options.reload_on_sighup and hasattr(signal, "SIGHUP")):
            return False
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, lambda: service.track(loop.create_task(reload_on_signal())))
        except (ValueError, RuntimeError) as err:    # not the main thread
            sys.stderr.write(f"mmssl serve: SIGHUP will not reload ({err}); POST /reload still does\n")
            return False
        return True

    @asynccontextmanager
    async def lifespan(app):
        service.start()
        on_sighup = install_sighup()
        try:
            yield
        finally:
            if on_sighup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            service.stop()

    app = FastAPI(title="mmssl search", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.state.images = service.default.images
    app.state.batcher = service.default.batcher
    if options.cors_origins:
        app.add_middleware(JSONCORSMiddleware, **cors_options(options.cors_origins))
    app.add_middleware(HostCheckMiddleware, policy=HostPolicy.for_bind(options.bind_host, options.allowed_hosts))

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        return error(500, f"internal error: {type(exc).__name__}")

    @app.exception_handler(BadRequest)
    async def bad_request(request, exc):
        return error(exc.status, exc.message, exc.headers)

    @app.exception_handler(QueueFull)
    async def queue_full(request, exc):
        return error(503, f"{exc}; retry shortly", RETRY)

    @app.exception_handler(WorkerUnavailable)
    async def worker_unavailable(request, exc):
        return error(503, str(exc), RETRY)

    @app.exception_handler(ClientGone)
    async def client_gone(request, exc):
        return error(499, "the client closed the connection")

    def image_url(served, i: int) -> str | None:
        if served.images.has(i):
            suffix = "" if served.name == service.default.name else f"?index={quote(served.name, safe='')}"
            return f"/image/{quote(served.folder.metadata.keys[i], safe='')}{suffix}"
        urls = served.folder.metadata.columns.get("url")
        return urls[i] if urls is not None else None

    @app.post("/search")
    async def search(request: Request):
        started = time.perf_counter()
        require_json_content_type(request)
        reservation = service.reservation()
        try:
            body = await service.read_body(request, reservation)
            query = parse_search_request(body, MAX_K, options.max_text_chars)
            del body
            served = service.index(query.index)
            if served.searcher.encoder is None:
                raise BadRequest(400, "this index was built from embeddings without a model: it cannot embed queries")
            deadline = service.deadline()
            rerank_k = service.rerank_k(served, query.kind, query.rerank_k)
            kind, value = await service.prepare(served, query.kind, query.value, reservation, deadline)
            hits = await service.answer(request, served, kind, value, query.k, deadline, rerank_k=rerank_k)
        finally:
            reservation.release()
        results = [{"rank": hit.rank, "key": hit.key, "caption": hit.caption, "score": round(hit.score, 6),
                    "image_url": image_url(served, hit.id)} for hit in hits]
        if rerank_k:
            for result, hit in zip(results, hits):
                result["match"] = None if hit.match is None else round(hit.match, 6)
        # a JSONResponse skips FastAPI's generic encoder: these are plain str/float/int already
        return JSONResponse({"results": results, "took_ms": round((time.perf_counter() - started) * 1000, 3)})

    @app.get("/image/{key:path}")
    def image(key: str, index: str | None = None):
        served = service.index(index)
        i = served.folder.metadata.key_to_id.get(key)
        if i is None:
            return error(404, f"no item with key {key[:200]!r}")
        stored = served.images.read(i)
        if stored is None:
            return error(404, f"no servable image for key {key[:200]!r}")
        data, media_type = stored
        return Response(data, media_type=media_type,
                        headers={"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"})

    @app.get("/health")
    async def health():
        healthy, body = service.health()
        return body if healthy else JSONResponse(body, status_code=503)

    @app.post("/reload")
    async def reload_route(request: Request):
        if request.headers.get("origin") is not None:
            return error(403, "POST /reload does not answer browsers (the request has an Origin header)")
        host = request.client.host if request.client else None
        if not options.allow_remote_reload and not is_loopback(host):
            return error(403, "POST /reload is answered only to loopback clients "
                              "(start the service with --allow-remote-reload to allow others)")
        try:
            answer = await reload()
        except ReloadBusy as err:
            return error(409, str(err))
        except ReloadFailed as err:
            return error(err.status, str(err))
        return JSONResponse({"reloaded": answer})

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE

    add_clip_retrieval_routes(app, service)
    return app


def is_loopback(host: str | None) -> bool:
    """Whether a client address is this machine's loopback (127.0.0.0/8, ::1, or IPv4-mapped 127.x)."""
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)
