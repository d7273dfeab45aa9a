"""`prep --engine ray`: each pending output shard is one Ray task that makes and writes it.

A task gets its shard number, that shard's rows and the per-row `process` (put in the object store
once per dataset) and writes the tar and its stats itself, atomically, through
data_prep.pipeline.write_shard_rows: the same code as the local engine, so the same bytes. The
driver keeps at most two tasks per cluster CPU in flight, then reads every stats file back and
writes manifest.json, sizes.json and failures.jsonl as the local engine does.

Assumption, as with img2dataset on a cluster: the output folder is on a filesystem every node
mounts at the same path (a single machine trivially is). A worker killed mid-shard leaves at most a
`.tmp`; Ray runs the task again (MAX_RETRIES), and since a shard's bytes depend only on its rows the
retry writes the same file. A task that still fails stops the run with one line; the shards written
so far are kept for `--resume`.
"""
from __future__ import annotations

import sys
from pathlib import Path

from mmssl.engines import ray_get, ray_resources, ray_session
from mmssl.errors import UserError

from data_prep import pipeline, shards

MAX_RETRIES = 3    # a task whose worker or node dies is run again this many times
TASKS_PER_CPU = 2  # in flight per cluster CPU: every CPU busy, the rows of a huge table not all queued


def write_shards(out_dir, rows: list, process, pending: list, *, shard_size: int, options: dict,
                 ray_address: str | None = None, desc: str = "prep", quiet: bool = False) -> dict:
    """Write the `pending` shards of `rows` into `out_dir` as Ray tasks; returns {shard: node id}."""
    from tqdm import tqdm

    if not pending:  # a --resume of a finished run: nothing to send anywhere
        return {}
    out_dir = str(Path(out_dir).resolve())  # a worker's working folder is not the driver's
    nodes = {}
    with ray_session(ray_address) as ray:
        # SPREAD: shards go round the nodes (disks, network and CPUs all share the work) rather than
        # filling the driver's node first
        task = ray.remote(num_cpus=1, max_retries=MAX_RETRIES, scheduling_strategy="SPREAD")(_write_shard)
        process_ref = ray.put(process)
        window = TASKS_PER_CPU * max(1, int(ray_resources(ray).get("CPU", 1)))
        todo = iter(pending)
        in_flight = {}
        progress = tqdm(total=sum(_rows_in(s, shard_size, rows) for s in pending), desc=desc, unit="row",
                        disable=True if quiet else None, file=sys.stderr)
        try:
            while True:
                for shard in todo:
                    start, stop = pipeline.shard_span(shard, shard_size, len(rows))
                    in_flight[task.remote(out_dir, shard, rows[start:stop], process_ref, shard_size, options)] = shard
                    if len(in_flight) >= window:
                        break
                if not in_flight:
                    break
                (done,), _ = ray.wait(list(in_flight), num_returns=1)
                shard = in_flight.pop(done)
                nodes[shard] = _result(ray, done, shard)
                progress.update(_rows_in(shard, shard_size, rows))
        finally:
            progress.close()
            for ref in in_flight:  # only after a failure: the run stops, the rest need not finish
                ray.cancel(ref)
    if not quiet:
        print(f"{desc}: {len(pending)} shard(s) written by Ray tasks on {len(set(nodes.values()))} node(s)",
              file=sys.stderr)
    return nodes


def _rows_in(shard: int, shard_size: int, rows: list) -> int:
    start, stop = pipeline.shard_span(shard, shard_size, len(rows))
    return stop - start


def _write_shard(out_dir: str, shard: int, rows: list, process, shard_size: int, options: dict) -> str:
    """The Ray task: one shard made and written; returns the id of the node it ran on."""
    import ray

    pipeline.write_shard_rows(Path(out_dir), shard, rows, process, shard_size, options)
    return ray.get_runtime_context().get_node_id()


def _result(ray, ref, shard: int) -> str:
    """A finished task's node id, or its failure as one UserError line."""
    name = shards.shard_name(shard)
    try:
        return ray_get(ray, ref)     # the output itself (disk full, permissions): its own line
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        reason = f"{type(cause).__name__}: {cause}" if cause is not None else str(err)
        raise UserError(f"the Ray task writing {name} failed ({reason.splitlines()[0]}); the shards "
                        "written so far are kept: rerun with --resume") from None
    except ray.exceptions.RayError as err:
        raise UserError(f"the Ray task writing {name} failed after {MAX_RETRIES} retries ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else 'no detail'}); the shards written so far are "
                        "kept: rerun with --resume") from None
