"""`mmssl embed --engine ray`: the parts run on Ray actors, each loading the model once.

Actors pull parts from the driver: each holds at most one part at a time and gets the next when it
returns. A killed actor process is replaced (`max_restarts`) and its part is run again
(`max_task_retries`); since a part's files are written atomically and are the same bits wherever it
runs (`eval.embed_parts`), every part ends up in OUT exactly once. Each actor reserves
`threads` CPUs (the torch threads it encodes with) and a GPU where the cluster has any.
"""
from __future__ import annotations

import os

from eval.embed_parts import Part, Settings, embed_part

RESTARTS = 3        # per actor: a worker killed more often than this fails the run


class PartWorker:
    """One model, many parts."""

    def __init__(self, checkpoint: str, precision: str, delay_s: float = 0.0):
        from eval.embed import load_model

        self.loaded = load_model(checkpoint, precision)
        self.delay_s = delay_s

    def pid(self) -> int:
        return os.getpid()

    def embed(self, part: Part, out: str, settings: Settings) -> dict:
        if self.delay_s:
            import time

            time.sleep(self.delay_s)       # tests only: widen the window in which a part is in flight
        return embed_part(self.loaded, part, out, settings)


def run_parts(ray, parts: list[Part], out: str, settings: Settings) -> list[dict]:
    """Every part's record, made on a pool of actors (as many as the cluster's CPUs / GPUs allow)."""
    resources = ray.cluster_resources()
    use_gpu = resources.get("GPU", 0) >= 1
    slots = int(resources.get("GPU", 0)) if use_gpu else int(resources.get("CPU", 1) // settings.threads)
    count = max(1, min(len(parts), slots))
    delay = float(os.environ.get("MMSSL_EMBED_TEST_DELAY_S", "0") or 0)
    remote = ray.remote(num_cpus=settings.threads, num_gpus=1 if use_gpu else 0,
                        max_restarts=RESTARTS, max_task_retries=RESTARTS)(PartWorker)
    actors = [remote.remote(settings.model, settings.precision, delay) for _ in range(count)]
    pending, records, todo = {}, [], list(parts)

    def submit(actor):
        part = todo.pop(0)
        pending[actor.embed.remote(part, out, settings)] = (actor, part)

    try:
        for actor in actors[:len(todo)]:
            submit(actor)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            actor, part = pending.pop(done[0])
            record = _result(ray, done[0], part)
            records.append(record)
            if todo:
                submit(actor)
    finally:
        for actor in actors:
            ray.kill(actor)
    return records


def _result(ray, ref, part: Part) -> dict:
    """The part's record; a UserError raised on an actor, or an actor that kept dying, is one line."""
    from mmssl.engines import ray_get
    from mmssl.errors import UserError

    try:
        return ray_get(ray, ref)
    except ray.exceptions.RayActorError:
        raise UserError(f"part {part.name}: its Ray worker died {RESTARTS + 1} times; the finished parts are "
                        "kept, rerun to resume") from None
