"""What every route shares: the served indexes, the limits, and answering one query within them.

A route reads its body with `read_body` (size, time and a byte budget shared by all requests),
turns the query into model input with `prepare` (images decoded, and image URLs fetched when
allowed, in bounded pools of threads), and awaits `answer` (the index's batching worker, the
request timeout, the client going away). `/search` and clip-retrieval's `/knn-service` are two
request formats over this one path, so every limit applies to both.

Several indexes can be served at once (`--index NAME=DIR`, repeatable); each has its own batching
worker, and indexes built with the same model share one query encoder.
"""
from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass

import anyio

from eval.index.stored_images import StoredImages
from eval.serve.batching import QueryBatcher
from eval.serve.requests import BadRequest, BodyBudget, Reservation, decode_base64_image, read_limited_body

WATCH_DISCONNECT_AFTER = 0.05   # seconds a query waits before its connection is watched
URL_FETCHERS = 4                # image URLs fetched at once (network waits, not CPU)
# clip-retrieval request options mmssl has no model for: accepted, never applied, always said so
UNSUPPORTED_OPTIONS = ("use_safety_model", "use_violence_detector", "use_mclip", "aesthetic_score")


class ClientGone(Exception):
    """The client closed its connection before the answer was ready."""


@dataclass
class ServedIndex:
    name: str
    searcher: object         # eval.index.search.Searcher
    images: StoredImages
    batcher: QueryBatcher

    @property
    def folder(self):
        return self.searcher.folder


class Service:
    def __init__(self, searchers: dict, options):
        if not searchers:
            raise ValueError("a service needs at least one index")
        self.options = options
        self.indexes = {
            name: ServedIndex(name, searcher, StoredImages.for_folder(searcher.folder),
                              QueryBatcher(searcher, max_batch=options.max_batch, max_queue=options.max_queue,
                                           restart_delay=options.restart_delay, stall_after=options.request_timeout,
                                           reranker=_reranker(searcher, options)))
            for name, searcher in searchers.items()}
        self.default = next(iter(self.indexes.values()))
        self.budget = BodyBudget(options.max_body_bytes_in_flight)
        self.counts = {"clients_gone": 0, "timeouts": 0}
        self.not_applied: Counter = Counter()     # clip-retrieval options asked for but not honoured
        self._decoders = self._fetchers = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._decoders = anyio.CapacityLimiter(self.options.image_decoders)
        self._fetchers = anyio.CapacityLimiter(URL_FETCHERS)
        for served in self.indexes.values():
            served.batcher.start()

    def stop(self) -> None:
        for served in self.indexes.values():
            served.batcher.stop()

    # ------------------------------------------------------------ one query

    def index(self, name) -> ServedIndex:
        """The index called `name` (None: the first one); 400 naming the known ones otherwise."""
        if name is None:
            return self.default
        if not isinstance(name, str) or name not in self.indexes:
            raise BadRequest(400, f"unknown index {str(name)[:100]!r}; this service has: {', '.join(self.indexes)}")
        return self.indexes[name]

    def reservation(self) -> Reservation:
        return Reservation(self.budget)

    async def read_body(self, request, reservation: Reservation) -> bytes:
        return await read_limited_body(request, self.options.max_body_bytes, self.options.body_timeout, reservation)

    def deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.options.request_timeout

    async def prepare(self, served: ServedIndex, kind: str, value, reservation: Reservation, deadline: float):
        """(kind, value) ready for the worker: an "image" (base64 text) or "image_url" query
        becomes ("image", the model's input tensor); text and vectors pass through."""
        if kind not in ("image", "image_url"):
            return kind, value
        encoder = served.searcher.encoder
        try:
            async with asyncio.timeout_at(deadline):
                if kind == "image_url":
                    from eval.serve.image_urls import fetch_image_bytes

                    data = await anyio.to_thread.run_sync(
                        fetch_image_bytes, value, self.options.max_body_bytes, self.options.image_url_timeout,
                        limiter=self._fetchers)
                    tensor = await anyio.to_thread.run_sync(_admit, encoder, data, self.options.image_limits,
                                                            limiter=self._decoders)
                else:   # base64 text of up to a body's size: decoded off the event loop too
                    tensor = await anyio.to_thread.run_sync(_admit_base64, encoder, value, self.options.image_limits,
                                                            limiter=self._decoders)
        except TimeoutError:
            raise self.timed_out() from None
        reservation.release()      # only the small input tensor is left
        return "image", tensor

    def timed_out(self) -> BadRequest:
        self.counts["timeouts"] += 1
        return BadRequest(504, f"no answer within {self.options.request_timeout:g} s (--request-timeout)")

    def rerank_k(self, served: ServedIndex, kind: str, asked, modality: str = "image") -> int:
        """Candidates to re-rank for one query: the request's `rerank_k` (0: none), else the service's
        default where the query can be re-ranked; 400 when it asks for what the service cannot do."""
        from eval.index.rerank import rerankable

        if asked is None:
            return self.options.rerank_k if served.batcher.reranker and rerankable(kind, modality) else 0
        if asked and not served.batcher.reranker:
            raise BadRequest(400, "this service does not re-rank: start it with --rerank itm")
        if asked and not rerankable(kind, modality):
            raise BadRequest(400, f"re-ranking needs a text query over images or an image query over captions, "
                                  f"not a {kind} query over {modality}s")
        return asked

    async def answer(self, request, served: ServedIndex, kind: str, value, k: int, deadline: float,
                     modality: str = "image", deduplicate: bool = False, rerank_k: int = 0) -> list:
        """The worker's hits, unless the deadline passes first (504) or the client goes away (its
        query is then dropped before the worker reaches it). Most answers come within
        WATCH_DISCONNECT_AFTER; only then is a task started to watch the connection, so that the
        common path costs no more than awaiting the answer."""
        answer = asyncio.wrap_future(served.batcher.submit(kind, value, k, modality, deduplicate, rerank_k))
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
            raise self.timed_out() from None
        except asyncio.CancelledError:
            if not client_gone:
                raise
            self.counts["clients_gone"] += 1
            raise ClientGone() from None
        finally:
            timer.cancel()
            if watcher is not None:
                watcher.cancel()

    # ------------------------------------------------------------ health

    def health(self) -> tuple[bool, dict]:
        """(healthy, the /health body): the first index's figures at the top level (as before
        several indexes could be served), every index under "indices", totals for the service."""
        indices, healthy, errors = {}, True, []
        for name, served in self.indexes.items():
            ok, why = served.batcher.health()
            healthy = healthy and ok
            if not ok:
                errors.append(why if len(self.indexes) == 1 else f"{name}: {why}")
            indices[name] = _index_health(served, ok)
        first = {key: value for key, value in indices[self.default.name].items() if key != "healthy"}
        body = {"status": "ok" if healthy else "unhealthy", **first,
                "indices": indices, "clients_gone": self.counts["clients_gone"], "timeouts": self.counts["timeouts"],
                "image_urls": self.options.allow_image_urls, "not_applied": dict(self.not_applied),
                "unsupported_options": list(UNSUPPORTED_OPTIONS)}
        if not healthy:
            body["error"] = "; ".join(errors)
        return healthy, body


def _index_health(served: ServedIndex, ok: bool) -> dict:
    folder, batcher, encoder = served.folder, served.batcher, served.searcher.encoder
    lookups = encoder.cache_hits + encoder.cache_misses if encoder else 0
    return {"count": folder.info["count"], "index": folder.info["index"]["factory"], "model": folder.model,
            "modalities": list(folder.modalities), "healthy": ok,
            "queries_served": batcher.served, "batches": batcher.batches,
            "queue_depth": batcher.queue_depth, "max_queue": batcher.max_queue,
            "worker_restarts": batcher.restarts, "skipped_cancelled": batcher.skipped_cancelled,
            "text_cache_hit_rate": round(encoder.cache_hits / lookups, 4) if lookups else None,
            "text_cache_bytes": encoder.cache_bytes_used if encoder else None}


def _reranker(searcher, options):
    if not options.rerank:
        return None
    from eval.index.rerank import SearchReranker

    return SearchReranker.for_searcher(searcher, options.rerank)


def _admit_base64(encoder, image: str, limits):
    return _admit(encoder, decode_base64_image(image), limits)


def _admit(encoder, data: bytes, limits):
    """Image bytes -> the model's input tensor, or 400/413 (runs in a decoder thread)."""
    from mmssl.data.image_guard import ImageRefused

    try:
        return encoder.prepare_image(data, limits)
    except ImageRefused as err:
        raise BadRequest(err.status, f"image refused: {err}") from None


async def _disconnected(request) -> None:
    """Returns once the client has closed the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
