"""What every route shares: the served indexes, the limits, and answering one query within them.

A route reads its body with `read_body` (size, time and a byte budget shared by all requests),
turns the query into model input with `prepare` (images decoded, and image URLs fetched when
allowed, in bounded pools of threads), and awaits `answer` (the index's batching worker, the
request timeout, the client going away). `/search` and clip-retrieval's `/knn-service` are two
request formats over this one path, so every limit applies to both.

Several indexes can be served at once (`--index NAME=DIR`, repeatable); each has its own batching
worker, and indexes built with the same model share one query encoder.

Reloading (`reload`, on `POST /reload` and SIGHUP): every served folder is loaded again from disk
off the event loop (sharing the query encoder when the model is the same), each with a new
batching worker; only when all have loaded are they swapped in, each as a whole new `ServedIndex`
in one assignment on the event loop. A request holds the `ServedIndex` it started with, so its
hits, metadata and image URLs all come from one version; the old worker answers what was queued on
it and is stopped once no request can still reach it (after the request timeout). A folder that
fails to load swaps nothing: the old versions keep serving.
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

import anyio

from eval.index.stored_images import StoredImages
from eval.serve.batching import QueryBatcher
from eval.serve.requests import BadRequest, BodyBudget, Reservation, decode_base64_image, read_limited_body

WATCH_DISCONNECT_AFTER = 0.05   # seconds a query waits before its connection is watched
URL_FETCHERS = 4                # image URLs fetched at once (network waits, not CPU)
# a worker's counter -> its /health name; summed over the workers that reloads replaced
WORKER_COUNTERS = {"served": "queries_served", "batches": "batches", "skipped_cancelled": "skipped_cancelled",
                   "restarts": "worker_restarts"}
# clip-retrieval request options mmssl has no model for: accepted, never applied, always said so
UNSUPPORTED_OPTIONS = ("use_safety_model", "use_violence_detector", "use_mclip", "aesthetic_score")


class ClientGone(Exception):
    """The client closed its connection before the answer was ready."""


class ReloadBusy(Exception):
    """A reload is already running."""


class ReloadFailed(Exception):
    """A served folder could not be loaded again; nothing was swapped."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


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
        self.indexes = {name: self._served(name, searcher) for name, searcher in searchers.items()}
        self.default = next(iter(self.indexes.values()))
        self.budget = BodyBudget(options.max_body_bytes_in_flight)
        self.counts = {"clients_gone": 0, "timeouts": 0, "reloads": 0, "reloads_failed": 0}
        self.reloading = False
        self._retiring: list[ServedIndex] = []    # replaced by a reload, their workers not yet stopped
        self._retired_counts: dict = defaultdict(Counter)   # name -> what its stopped old workers counted
        self._tasks: set = set()                 # background tasks: workers being retired, signalled reloads
        self.not_applied: Counter = Counter()     # clip-retrieval options asked for but not honoured
        self._decoders = self._fetchers = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._decoders = anyio.CapacityLimiter(self.options.image_decoders)
        self._fetchers = anyio.CapacityLimiter(URL_FETCHERS)
        for served in self.indexes.values():
            served.batcher.start()

    def stop(self) -> None:
        for served in [*self.indexes.values(), *self._retiring]:
            served.batcher.stop()
        self._retiring.clear()

    def _served(self, name: str, searcher, reranker_head=None) -> ServedIndex:
        """A ServedIndex for `searcher` with its own (not yet started) batching worker; UserError when
        its rows name images outside its recorded roots."""
        images = StoredImages.for_folder(searcher.folder)
        if reranker_head is not None:
            from eval.index.rerank import SearchReranker

            reranker = SearchReranker(searcher, reranker_head, StoredImages.for_folder(searcher.folder))
        else:
            reranker = _reranker(searcher, self.options)
        options = self.options
        return ServedIndex(name, searcher, images,
                           QueryBatcher(searcher, max_batch=options.max_batch, max_queue=options.max_queue,
                                        restart_delay=options.restart_delay, stall_after=options.request_timeout,
                                        reranker=reranker))

    # ------------------------------------------------------------ reloading

    async def reload(self) -> dict:
        """Load every served folder again and swap the new versions in (see the module docstring);
        {name: {old_count, new_count, old_version, new_version, took_ms}}. ReloadBusy while another
        reload runs; ReloadFailed (nothing swapped) when a folder does not load."""
        if self.reloading:
            raise ReloadBusy("a reload is already running; retry when it ends")
        self.reloading = True
        try:
            try:
                fresh = await anyio.to_thread.run_sync(self._load_again)
            except ReloadFailed:
                self.counts["reloads_failed"] += 1
                raise
            answer = {}
            for name, (new, took_ms) in fresh.items():
                old = self.indexes[name]
                self.indexes[name] = new           # one assignment: a request sees the old or the new
                if old is self.default:
                    self.default = new
                self._retire(old)
                answer[name] = {"old_count": old.folder.info["count"], "new_count": new.folder.info["count"],
                                "old_version": version(old.folder.info), "new_version": version(new.folder.info),
                                "took_ms": took_ms}
            self.counts["reloads"] += 1
            return answer
        finally:
            self.reloading = False

    def _load_again(self) -> dict:
        """{name: (new ServedIndex with a started worker, ms to load)} (runs in a thread)."""
        from eval.index.search import Searcher
        from mmssl.errors import UserError

        encoders = {served.folder.model: served.searcher.encoder
                    for served in self.indexes.values() if served.searcher.encoder is not None}
        fresh = {}
        try:
            for name, served in self.indexes.items():
                started = time.perf_counter()
                try:
                    searcher = Searcher.open(str(served.folder.path), encoders)
                    same_model = searcher.folder.model == served.folder.model and served.batcher.reranker
                    new = self._served(name, searcher, served.batcher.reranker.head if same_model else None)
                except UserError as err:
                    raise ReloadFailed(f"index {name!r}: {err}; still serving the previous version", 422) from None
                except Exception as err:  # noqa: BLE001 - whatever it is, the old version must keep serving
                    raise ReloadFailed(f"index {name!r}: {type(err).__name__}: {str(err)[:300]}; still serving "
                                       "the previous version", 500) from None
                new.batcher.start()
                fresh[name] = (new, round((time.perf_counter() - started) * 1000, 3))
        except BaseException:
            for new, _ in fresh.values():
                new.batcher.stop()
            raise
        return fresh

    def _retire(self, old: ServedIndex) -> None:
        """Stop `old`'s worker once no request can still submit to it: a request that took `old`
        before the swap submits within the request timeout, and what it queued is answered first."""
        self._retiring.append(old)

        async def drain() -> None:
            loop = asyncio.get_running_loop()
            give_up = loop.time() + 2 * self.options.request_timeout + 1
            await asyncio.sleep(self.options.request_timeout + 0.5)
            while old.batcher.busy and loop.time() < give_up:
                await asyncio.sleep(0.05)
            await anyio.to_thread.run_sync(old.batcher.stop)
            if old in self._retiring:
                self._retiring.remove(old)
                for counter in WORKER_COUNTERS:
                    self._retired_counts[old.name][counter] += getattr(old.batcher, counter)

        self.track(asyncio.get_running_loop().create_task(drain()))

    def track(self, task) -> None:
        """Keep a background task alive until it ends (the loop holds tasks only weakly)."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
            indices[name] = {**_index_health(served, ok), **self._worker_counts(name)}
        first = {key: value for key, value in indices[self.default.name].items() if key != "healthy"}
        body = {"status": "ok" if healthy else "unhealthy", **first,
                "indices": indices, "clients_gone": self.counts["clients_gone"], "timeouts": self.counts["timeouts"],
                "reloads": self.counts["reloads"], "reloads_failed": self.counts["reloads_failed"],
                "image_urls": self.options.allow_image_urls, "not_applied": dict(self.not_applied),
                "unsupported_options": list(UNSUPPORTED_OPTIONS)}
        if not healthy:
            body["error"] = "; ".join(errors)
        return healthy, body

    def _worker_counts(self, name: str) -> dict:
        """The counters of index `name`'s workers, the ones retired by reloads included."""
        workers = [self.indexes[name].batcher] + [old.batcher for old in self._retiring if old.name == name]
        return {shown: sum(getattr(worker, counter) for worker in workers) + self._retired_counts[name][counter]
                for counter, shown in WORKER_COUNTERS.items()}

def _index_health(served: ServedIndex, ok: bool) -> dict:
    folder, batcher, encoder = served.folder, served.batcher, served.searcher.encoder
    lookups = encoder.cache_hits + encoder.cache_misses if encoder else 0
    return {"count": folder.info["count"], "version": version(folder.info),
            "index": folder.info["index"]["factory"], "model": folder.model,
            "modalities": list(folder.modalities), "healthy": ok,
            "queries_served": batcher.served, "batches": batcher.batches,
            "queue_depth": batcher.queue_depth, "max_queue": batcher.max_queue,
            "worker_restarts": batcher.restarts, "skipped_cancelled": batcher.skipped_cancelled,
            "text_cache_hit_rate": round(encoder.cache_hits / lookups, 4) if lookups else None,
            "text_cache_bytes": encoder.cache_bytes_used if encoder else None}


def version(info: dict) -> str:
    """A short name for one version of an index folder: the start of its keys' SHA-256."""
    return info["keys_sha256"][:12]


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
