"""The FastAPI application: routes, JSON errors, image bytes straight from the shards."""
from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from eval.serve.batching import QueryBatcher
from eval.serve.page import PAGE
from eval.serve.requests import BadRequest, decode_image_field, parse_search_request, read_limited_body

from eval.serve import MAX_BATCH

MAX_BODY_BYTES = 10 * 2**20
MAX_K = 1000


def create_app(searcher, max_batch: int = MAX_BATCH, max_body_bytes: int = MAX_BODY_BYTES):
    """The FastAPI app for a `Searcher`; the batching worker starts and stops with the app."""
    folder = searcher.folder
    metadata = folder.metadata
    batcher = QueryBatcher(searcher, max_batch=max_batch)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="mmssl search", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        return error(500, f"internal error: {type(exc).__name__}")

    @app.exception_handler(BadRequest)
    async def bad_request(request, exc):
        return error(exc.status, exc.message)

    def image_url(i: int) -> str | None:
        if metadata.has_local_image(i):
            return f"/image/{quote(metadata.keys[i], safe='')}"
        urls = metadata.columns.get("url")
        return urls[i] if urls is not None else None

    @app.post("/search")
    async def search(request: Request):
        started = time.perf_counter()
        body = await read_limited_body(request, max_body_bytes)
        query = parse_search_request(body, MAX_K, searcher.encoder is not None)
        value = query.value
        if query.kind == "image":
            value = await run_in_threadpool(decode_image_field, value)
        hits = await asyncio.wrap_future(batcher.submit(query.kind, value, query.k))
        results = [{"rank": hit.rank, "key": hit.key, "caption": hit.caption, "score": round(hit.score, 6),
                    "image_url": image_url(hit.id)} for hit in hits]
        # a JSONResponse skips FastAPI's generic encoder: these are plain str/float/int already
        return JSONResponse({"results": results, "took_ms": round((time.perf_counter() - started) * 1000, 3)})

    @app.get("/image/{key:path}")
    def image(key: str):
        i = metadata.key_to_id.get(key)
        if i is None:
            return error(404, f"no item with key {key!r}")
        data = metadata.read_image(i)
        if data is None:
            return error(404, f"no stored image for key {key!r}")
        return Response(data, media_type=_media_type(data), headers={"Cache-Control": "max-age=3600"})

    @app.get("/health")
    def health():
        encoder = searcher.encoder
        lookups = encoder.cache_hits + encoder.cache_misses if encoder else 0
        return {"status": "ok", "count": folder.info["count"], "index": folder.info["index"]["factory"],
                "model": folder.model, "queries_served": batcher.served, "batches": batcher.batches,
                "text_cache_hit_rate": round(encoder.cache_hits / lookups, 4) if lookups else None}

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE

    return app


def _media_type(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"
