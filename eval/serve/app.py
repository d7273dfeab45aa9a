"""The FastAPI application: routes, JSON errors, the limits of `ServeOptions`, stored images.

Every answer to a bad or unlucky request is a 4xx/5xx JSON `{"error": ...}`:
400 bad query or unknown index, 404 unknown key / route or no servable image, 405 wrong method,
408 body too slow, 413 body or image over a limit, 415 not JSON, 421 Host not allowed, 499 client
went away (never seen by it), 500 a failure while answering, 503 queue full / body budget spent /
worker restarting (with Retry-After), 504 no answer within the request timeout. `/health`
answers 503 while a query worker is down or stuck. clip-retrieval's routes (`/knn-service`,
`/metadata`, `/indices-list`, `/config.json`) come from `eval.serve.clip_retrieval`.
"""
from __future__ import annotations

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
from eval.serve.service import ClientGone, Service

MAX_K = 1000


def create_app(searchers, options: ServeOptions | None = None):
    """The FastAPI app for one `Searcher` or a {name: Searcher} dict (the first is the default
    index); the batching workers start and stop with the app. UserError when an index's rows name
    images outside its recorded roots."""
    options = options or ServeOptions()
    if not isinstance(searchers, dict):
        searchers = {searchers.folder.path.name: searchers}
    service = Service(searchers, options)

    @asynccontextmanager
    async def lifespan(app):
        service.start()
        yield
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
            suffix = "" if served is service.default else f"?index={quote(served.name, safe='')}"
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

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE

    add_clip_retrieval_routes(app, service)
    return app
