"""The FastAPI application: routes, JSON errors, the limits of `ServeOptions`, stored images.

Every answer to a bad or unlucky request is a 4xx/5xx JSON `{"error": ...}`:
400 bad query, 404 unknown key / route or no servable image, 405 wrong method, 408 body too slow,
413 body or image over a limit, 415 not JSON, 421 Host not allowed, 499 client went away (never
seen by it), 500 a failure while answering, 503 queue full / body budget spent / worker
restarting (with Retry-After), 504 no answer within the request timeout. `/health` answers 503
while the query worker is down or stuck.
"""
from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from urllib.parse import quote

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from eval.index.stored_images import StoredImages
from eval.serve.batching import QueryBatcher, QueueFull, WorkerUnavailable
from eval.serve.cors import JSONCORSMiddleware, cors_options
from eval.serve.hosts import HostCheckMiddleware, HostPolicy
from eval.serve.options import ServeOptions
from eval.serve.page import PAGE
from eval.serve.requests import (RETRY, BadRequest, BodyBudget, Reservation, parse_search_request,
                                 prepare_image_field, read_limited_body, require_json_content_type)

MAX_K = 1000
WATCH_DISCONNECT_AFTER = 0.05   # seconds a query waits before its connection is watched


class ClientGone(Exception):
    """The client closed its connection before the answer was ready."""


def create_app(searcher, options: ServeOptions | None = None):
    """The FastAPI app for a `Searcher`; the batching worker starts and stops with the app.
    UserError when the index's rows name images outside its recorded roots."""
    options = options or ServeOptions()
    folder = searcher.folder
    metadata = folder.metadata
    images = StoredImages.for_folder(folder)
    batcher = QueryBatcher(searcher, max_batch=options.max_batch, max_queue=options.max_queue,
                           restart_delay=options.restart_delay, stall_after=options.request_timeout)
    budget = BodyBudget(options.max_body_bytes_in_flight)
    counts = {"clients_gone": 0, "timeouts": 0}
    decoders = {}

    @asynccontextmanager
    async def lifespan(app):
        decoders["limiter"] = anyio.CapacityLimiter(options.image_decoders)
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="mmssl search", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.images = images
    app.state.batcher = batcher
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

    def image_url(i: int) -> str | None:
        if images.has(i):
            return f"/image/{quote(metadata.keys[i], safe='')}"
        urls = metadata.columns.get("url")
        return urls[i] if urls is not None else None

    async def prepared_value(query, reservation: Reservation, deadline: float):
        """The text, or the image's input tensor (decoded in a bounded pool of threads)."""
        if query.kind != "image":
            return query.value
        try:
            async with asyncio.timeout_at(deadline):
                value = await anyio.to_thread.run_sync(prepare_image_field, query.value, searcher.encoder,
                                                       options.image_limits, limiter=decoders["limiter"])
        except TimeoutError:
            raise timed_out() from None
        reservation.release()      # only the small input tensor is left
        return value

    def timed_out() -> BadRequest:
        counts["timeouts"] += 1
        return BadRequest(504, f"no answer within {options.request_timeout:g} s (--request-timeout)")

    async def answer_by(request: Request, future, deadline: float):
        """The worker's answer, unless the deadline passes first (504) or the client goes away (its
        query is then dropped before the worker reaches it). Most answers come within
        WATCH_DISCONNECT_AFTER; only then is a task started to watch the connection, so that the
        common path costs no more than awaiting the answer."""
        answer = asyncio.wrap_future(future)
        watcher, client_gone = None, False

        async def watch() -> None:
            nonlocal client_gone
            await _disconnected(request)
            client_gone = True
            answer.cancel()            # cancels the queued future too: the worker skips it

        def start_watching() -> None:
            nonlocal watcher
            watcher = asyncio.ensure_future(watch())

        timer = asyncio.get_running_loop().call_later(WATCH_DISCONNECT_AFTER, start_watching)
        try:
            async with asyncio.timeout_at(deadline):   # on expiry the answer is cancelled with the wait
                return await answer
        except TimeoutError:
            raise timed_out() from None
        except asyncio.CancelledError:
            if not client_gone:
                raise
            counts["clients_gone"] += 1
            raise ClientGone() from None
        finally:
            timer.cancel()
            if watcher is not None:
                watcher.cancel()

    @app.post("/search")
    async def search(request: Request):
        started = time.perf_counter()
        require_json_content_type(request)
        reservation = Reservation(budget)
        try:
            body = await read_limited_body(request, options.max_body_bytes, options.body_timeout, reservation)
            query = parse_search_request(body, MAX_K, searcher.encoder is not None, options.max_text_chars)
            del body
            deadline = asyncio.get_running_loop().time() + options.request_timeout
            value = await prepared_value(query, reservation, deadline)
            hits = await answer_by(request, batcher.submit(query.kind, value, query.k), deadline)
        finally:
            reservation.release()
        results = [{"rank": hit.rank, "key": hit.key, "caption": hit.caption, "score": round(hit.score, 6),
                    "image_url": image_url(hit.id)} for hit in hits]
        # a JSONResponse skips FastAPI's generic encoder: these are plain str/float/int already
        return JSONResponse({"results": results, "took_ms": round((time.perf_counter() - started) * 1000, 3)})

    @app.get("/image/{key:path}")
    def image(key: str):
        i = metadata.key_to_id.get(key)
        if i is None:
            return error(404, f"no item with key {key[:200]!r}")
        stored = images.read(i)
        if stored is None:
            return error(404, f"no servable image for key {key[:200]!r}")
        data, media_type = stored
        return Response(data, media_type=media_type,
                        headers={"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"})

    @app.get("/health")
    async def health():
        healthy, why = batcher.health()
        encoder = searcher.encoder
        lookups = encoder.cache_hits + encoder.cache_misses if encoder else 0
        body = {"status": "ok" if healthy else "unhealthy", "count": folder.info["count"],
                "index": folder.info["index"]["factory"], "model": folder.model,
                "queries_served": batcher.served, "batches": batcher.batches,
                "queue_depth": batcher.queue_depth, "max_queue": batcher.max_queue,
                "worker_restarts": batcher.restarts, "skipped_cancelled": batcher.skipped_cancelled,
                "clients_gone": counts["clients_gone"], "timeouts": counts["timeouts"],
                "text_cache_hit_rate": round(encoder.cache_hits / lookups, 4) if lookups else None,
                "text_cache_bytes": encoder.cache_bytes_used if encoder else None}
        if not healthy:
            body["error"] = why
            return JSONResponse(body, status_code=503)
        return body

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE

    return app


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
