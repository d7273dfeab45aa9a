"""One worker thread that answers queries in batches: embed together, search FAISS together.

Requests arrive on a queue; the worker blocks for the first, then takes whatever else is already
waiting (up to `max_batch`), so a lone query is answered at once and a crowd is answered in one
forward pass per kind. Results go back through `concurrent.futures.Future`, which the event loop
awaits. An exception while serving a batch fails only that batch's requests.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future

_STOP = object()


class QueryBatcher:
    def __init__(self, searcher, max_batch: int = 32):
        self.searcher = searcher
        self.max_batch = max_batch
        self.served = 0
        self.batches = 0
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="query-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout=10)
            self._thread = None

    def submit(self, kind: str, value, k: int) -> Future:
        """Future of the hit list for one query (`kind` is "text" or "image")."""
        future: Future = Future()
        self._queue.put((kind, value, k, future))
        return future

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    self._queue.put(_STOP)
                    break
                batch.append(item)
            for kind in ("text", "image"):
                group = [item for item in batch if item[0] == kind]
                if group:
                    self._answer(kind, group)
            self.batches += 1

    def _answer(self, kind: str, group: list) -> None:
        try:
            values = [value for _, value, _, _ in group]
            k = max(item_k for _, _, item_k, _ in group)
            search = self.searcher.search_texts if kind == "text" else self.searcher.search_images
            hits = search(values, k)
        except Exception as err:  # a failure must reach the waiting requests, not kill the worker
            for *_, future in group:
                future.set_exception(err)
            return
        for (_, _, item_k, future), item_hits in zip(group, hits):
            future.set_result(item_hits[:item_k])
        self.served += len(group)
