"""One worker thread that answers queries in batches: embed together, search FAISS together.

Requests arrive on a bounded queue; the worker blocks for the first, then takes whatever else is
already waiting (up to `max_batch`), so a lone query is answered at once and a crowd is answered
in one forward pass per kind. Results go back through `concurrent.futures.Future`, which the
event loop awaits.

Robustness: a request whose future was cancelled (its client went away, or it timed out while
waiting) is dropped before any model work (`set_running_or_notify_cancel`); an exception while
serving a batch fails only that batch's requests; a full queue refuses new requests at once
(`QueueFull`) instead of letting latency and memory grow. Should the worker thread still die, a
supervisor thread fails the requests it held and those waiting with `WorkerUnavailable`, and
starts a new worker after `restart_delay`; `health()` reports the truth meanwhile.
"""
from __future__ import annotations

import queue
import sys
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

import numpy as np


class QueueFull(Exception):
    """The queue of waiting queries is full: the service is overloaded, retry later."""


class WorkerUnavailable(Exception):
    """The query worker stopped (or the service is shutting down) before answering."""


@dataclass
class Pending:
    kind: str          # "text" | "image" | "vector"
    value: object      # the text, the image's input tensor, or a unit vector
    k: int
    future: Future
    modality: str = "image"     # the index searched: "image" or "text" (captions)
    deduplicate: bool = False   # drop near-duplicates of better-ranked hits (after the top k)
    rerank_k: int = 0           # > 0: the top rerank_k reordered by the re-ranker before the top k is cut


class QueryBatcher:
    def __init__(self, searcher, max_batch: int = 32, max_queue: int = 256, restart_delay: float = 0.5,
                 stall_after: float | None = None, reranker=None):
        self.searcher = searcher
        self.reranker = reranker             # eval.index.rerank.SearchReranker, or None
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.restart_delay = restart_delay
        self.stall_after = stall_after       # a batch running longer than this reports unhealthy
        self.served = 0
        self.batches = 0
        self.skipped_cancelled = 0
        self.restarts = 0
        self.last_error: str | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None
        self._supervisor: threading.Thread | None = None
        self._held: list[Pending] = []       # the batch being answered
        self._batch_started: float | None = None
        self._restarting = False

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._stopping.clear()
        self._supervisor = threading.Thread(target=self._supervise, name="query-supervisor", daemon=True)
        self._supervisor.start()
        deadline = time.monotonic() + 10
        while not self.alive and time.monotonic() < deadline:
            time.sleep(0.001)

    def stop(self) -> None:
        if self._supervisor is None:
            return
        self._stopping.set()
        self._supervisor.join(timeout=10)
        self._supervisor = None
        self._fail_held_and_waiting(WorkerUnavailable("the service is shutting down"))

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            worker = threading.Thread(target=self._run_guarded, name="query-batcher", daemon=True)
            worker.start()
            self._worker = worker
            self._restarting = False
            worker.join()
            if self._stopping.is_set():
                return
            self._restarting = True
            self.restarts += 1
            self._fail_held_and_waiting(WorkerUnavailable(
                "the query worker stopped unexpectedly and is being restarted; retry shortly"))
            self._stopping.wait(self.restart_delay)

    # ------------------------------------------------------------ the request side

    def submit(self, kind: str, value, k: int, modality: str = "image", deduplicate: bool = False,
               rerank_k: int = 0) -> Future:
        """Future of the hit list for one query; QueueFull or WorkerUnavailable at once when the
        query cannot be taken."""
        if not self.alive:
            raise WorkerUnavailable("the query worker is restarting; retry shortly")
        future: Future = Future()
        try:
            self._queue.put_nowait(Pending(kind, value, k, future, modality, deduplicate, rerank_k))
        except queue.Full:
            raise QueueFull(f"the query queue is full ({self.max_queue} waiting)") from None
        return future

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def busy(self) -> bool:
        """Queries are waiting or being answered (a batcher being retired after a reload waits for none)."""
        return bool(self._held) or not self._queue.empty()

    @property
    def alive(self) -> bool:
        return (self._worker is not None and self._worker.is_alive() and not self._restarting
                and not self._stopping.is_set())

    def health(self) -> tuple[bool, str | None]:
        """(healthy, why not)."""
        if not self.alive:
            why = "the query worker is not running"
            return False, f"{why} (last error: {self.last_error})" if self.last_error else why
        started = self._batch_started
        if self.stall_after is not None and started is not None and time.monotonic() - started > self.stall_after:
            return False, f"the query worker has been on one batch for over {self.stall_after:g} s"
        return True, None

    # ------------------------------------------------------------ the worker

    def _run_guarded(self) -> None:
        try:
            self._run()
        except BaseException as err:  # noqa: BLE001 - whatever ends the thread, the supervisor must know
            self.last_error = f"{type(err).__name__}: {err}"
            sys.stderr.write(f"mmssl serve: query worker stopped: {self.last_error}\n")

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            live = [item for item in batch if item.future.set_running_or_notify_cancel()]
            self.skipped_cancelled += len(batch) - len(live)
            if not live:
                continue
            self._held, self._batch_started = live, time.monotonic()
            try:
                for kind, modality in dict.fromkeys((item.kind, item.modality) for item in live):
                    self._answer(kind, modality, [item for item in live
                                                  if item.kind == kind and item.modality == modality])
            except Exception as err:  # noqa: BLE001 - a bug here must not end the worker
                for item in live:
                    _settle(item.future, error=err)
            # not in a `finally`: should the thread die, the supervisor fails what it still holds
            self._held, self._batch_started = [], None
            self.batches += 1

    def _answer(self, kind: str, modality: str, group: list[Pending]) -> None:
        """One search for the group (same kind, same index), one re-ranking pass for the queries
        that asked for it, then each query's own top k."""
        try:
            k = max(max(item.k, item.rerank_k) for item in group)
            values = [item.value for item in group]
            if kind == "vector":
                hits = self.searcher.search_vectors(np.stack(values), k, modality)
            else:
                search = self.searcher.search_texts if kind == "text" else self.searcher.search_images
                hits = search(values, k, modality)
            reranked = [i for i, item in enumerate(group) if item.rerank_k > 0]
            if reranked:
                better = self.reranker.rerank(kind, [values[i] for i in reranked],
                                              [hits[i][:group[i].rerank_k] for i in reranked], modality)
                for i, top in zip(reranked, better):
                    hits[i] = top
        except Exception as err:  # a failure must reach the waiting requests, not end the worker
            for item in group:
                _settle(item.future, error=err)
            return
        for item, item_hits in zip(group, hits):
            try:
                top = item_hits[:item.k]
                _settle(item.future, result=self.searcher.deduplicate(top, modality) if item.deduplicate else top)
            except Exception as err:  # noqa: BLE001
                _settle(item.future, error=err)
        self.served += len(group)

    def _fail_held_and_waiting(self, error: Exception) -> None:
        for item in self._held:
            _settle(item.future, error=error)
        self._held, self._batch_started = [], None
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item.future.set_running_or_notify_cancel():
                _settle(item.future, error=error)
            else:
                self.skipped_cancelled += 1


def _settle(future: Future, result=None, error: BaseException | None = None) -> None:
    """Set a future's outcome unless it already has one."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
