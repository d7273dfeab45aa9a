"""Rows in, shards out: the one driver every `prep` mode uses.

Determinism is what makes `--resume` and `--workers` safe: row i always lands in shard
i // shard_size under key `{shard:05d}{i % shard_size:04d}`, and a sample depends only on its row.
So any worker count, and any interrupted-then-resumed run, writes the same bytes as one
uninterrupted single-process run. Workers process small chunks of rows (good balance even with few
shards); the parent receives results in order and writes each shard as soon as it is complete.

Where the shards are made is the `engine`'s choice: `local` (this process and its worker
processes, in chunks) or `ray` (one Ray task per pending shard, data_prep.ray_engine). Both turn a
shard's rows into its file through the same `process_rows` and `shard_contents`, and the driver
writes the manifest, so the engine never shows in the output: the bytes are the same.

Every row is accounted for: whatever one row raises (a SampleFailure with its reason, or any
other exception from opening, decoding, resizing or encoding it) makes it a failures.jsonl entry,
so `written + failed == rows in`. Only errors of the output itself stop the run (UserError from
data_prep.shards). `--resume` continues only shards written with the same options and the same
input content (`input_sha256`), so a changed table never mixes into finished shards.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import multiprocessing
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from mmssl.engines import ENGINES, import_ray, ray_session
from mmssl.errors import UserError

from data_prep import shards
from data_prep.samples import SampleFailure, unexpected_failure

CHUNK_ROWS = 64  # rows per worker task: small enough to balance 2 workers over one shard

_worker_process = None  # the per-row callable, installed once per worker process
_worker_shard_size = None


def write_dataset(
    out_dir,
    rows: list,
    process,
    *,
    source: dict,
    image_size,
    shard_size: int = 1000,
    workers: int = 1,
    resume: bool = False,
    overwrite: bool = False,
    extra: dict | None = None,
    input_sha256: str | None = None,
    desc: str = "prep",
    quiet: bool = False,
    engine: str = "local",
    ray_address: str | None = None,
) -> dict:
    """Write `rows` through `process(index, row) -> Sample` (or SampleFailure) into shards.

    `input_sha256` is the content hash of the input (see data_prep.input_hash; None where the
    rows are fully described by `source`, as for the synthetic world). `engine="ray"` makes each
    pending shard a task on the Ray cluster at `ray_address` (`workers` is then unused; `out_dir`
    must be on a filesystem every node sees). Returns the manifest dict.
    Raises UserError for empty input, bad sizes, an output that cannot be written, or a `--resume`
    whose options or input differ from those of the shards already finished.
    """
    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}: choose {' or '.join(ENGINES)}")
    if engine == "ray":
        import_ray()  # no Ray: one line before any output is made
    if shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, got {shard_size}")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if not rows:
        raise UserError(f"no rows to write for {out_dir}: the input is empty")
    out_dir = Path(out_dir)
    shards.prepare_output_dir(out_dir, resume=resume, overwrite=overwrite)
    # stored in every shard's stats and compared on --resume; the JSON round trip makes it comparable
    options = json.loads(json.dumps(
        {"source": source, "image_size": image_size, "shard_size": shard_size, "num_rows": len(rows),
         "input_sha256": input_sha256}, default=str
    ))
    num_shards = math.ceil(len(rows) / shard_size)
    pending = [s for s in range(num_shards) if not _finished_with(out_dir, s, options)]
    if engine == "ray":
        from data_prep import ray_engine

        ray_engine.write_shards(out_dir, rows, process, pending, shard_size=shard_size, options=options,
                                ray_address=ray_address, desc=desc, quiet=quiet)
    else:
        _write_pending(out_dir, rows, process, pending, shard_size, workers, options, desc, quiet)
    all_stats = [shards.read_stats(out_dir, s) for s in range(num_shards)]
    manifest = shards.write_manifest(
        out_dir, all_stats, source=source, image_size=image_size, shard_size=shard_size,
        extra={"input_sha256": input_sha256, **(extra or {})},
    )
    assert manifest["num_samples"] + manifest["num_failures"] == len(rows), "a row was lost"
    return manifest


def engine_session(engine: str, ray_address: str | None = None):
    """A block in which several write_dataset calls share one Ray (joined or started once); a no-op
    for the local engine, which never imports Ray."""
    return ray_session(ray_address) if engine == "ray" else contextlib.nullcontext()


def shard_span(shard: int, shard_size: int, num_rows: int) -> tuple[int, int]:
    """The rows [start, stop) that make shard `shard`."""
    return shard * shard_size, min((shard + 1) * shard_size, num_rows)


def write_shard_rows(out_dir: Path, shard: int, rows: list, process, shard_size: int, options: dict) -> None:
    """Make and write shard `shard` (tar, then stats) from all of its rows: one engine task's work."""
    first_row = shard * shard_size
    results = process_rows(process, first_row, rows, shard_size)
    shards.write_shard(out_dir, shard, *shard_contents(shard, first_row, rows, results, options))


def process_rows(process, start: int, rows: list, shard_size: int) -> list:
    """Each row (row `start + i` of the input) as its finished tar members, or its SampleFailure.

    Any exception of one row is that row's failure, never the run's (see unexpected_failure).
    """
    results = []
    for index, row in enumerate(rows, start):
        shard, position = divmod(index, shard_size)
        try:
            sample = process(index, row)
            results.append(shards.sample_members(shards.sample_key(shard, position, shard_size), sample))
        except SampleFailure as failure:
            results.append(failure)
        except Exception as err:  # noqa: BLE001 - a bug or a library's surprise on one row loses only that row
            results.append(unexpected_failure(err))
    return results


def shard_contents(shard: int, first_row: int, rows: list, results: list, options: dict) -> tuple[list, dict]:
    """(tar members, stats) of a shard from its rows and their process_rows results."""
    members = [result for result in results if not isinstance(result, SampleFailure)]
    failures = [{"row": index, "input": _describe(row), "reason": str(result)}
                for index, (row, result) in enumerate(zip(rows, results), first_row)
                if isinstance(result, SampleFailure)]
    stats = {
        "shard": shard,
        "name": shards.shard_name(shard),
        "first_row": first_row,
        "count": len(results),         # img2dataset's meaning: rows tried in this shard
        "successes": len(members),     # samples written (what loaders count)
        "failed": len(failures),
        "failures": failures,
        "options": options,
    }
    return members, stats


def summary_line(desc: str, manifest: dict, out_dir) -> str:
    """`written + failed == rows in`, as printed at the end of every prep run."""
    return (
        f"{desc}: {manifest['num_rows']} rows in, {manifest['num_samples']} written, "
        f"{manifest['num_failures']} failed -> {out_dir} (failures in {shards.FAILURES})"
    )


def _finished_with(out_dir: Path, shard: int, options: dict) -> bool:
    """Whether `shard` is done and written with `options`; UserError when done with others.

    A stats file that cannot be read back is no evidence of a finished shard: it is redone.
    Stats from before input hashes were recorded count as `input_sha256: null`.
    """
    if not shards.is_finished(out_dir, shard):
        return False
    try:
        written = {"input_sha256": None, **shards.read_stats(out_dir, shard)["options"]}
    except (OSError, ValueError, TypeError, KeyError):
        return False
    if written == options:
        return True
    name = shards.shard_name(shard)
    if {**written, "input_sha256": None} == {**options, "input_sha256": None}:
        raise UserError(
            f"cannot resume {out_dir}: the input changed since shard {name} was written "
            "(its content hash differs); use --overwrite to start again"
        )
    raise UserError(
        f"cannot resume {out_dir}: shard {name} was written with different inputs or options; "
        "use --overwrite to start again"
    )


def _chunks(rows: list, pending: list, shard_size: int):
    for shard in pending:
        first, end = shard_span(shard, shard_size, len(rows))
        for start in range(first, end, CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, end)
            yield start, rows[start:stop]


def _install(process, shard_size: int) -> None:
    global _worker_process, _worker_shard_size
    _worker_process, _worker_shard_size = process, shard_size


def _run_chunk(task):
    """A chunk's process_rows results in a worker (the parent only appends bytes)."""
    start, chunk = task
    return start, process_rows(_worker_process, start, chunk, _worker_shard_size)


def _pool_context():
    # fork starts workers instantly and shares the rows; fall back where fork does not exist
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _write_pending(out_dir, rows, process, pending, shard_size, workers, options, desc, quiet):
    from tqdm import tqdm

    tasks = _chunks(rows, pending, shard_size)
    total = sum(stop - start for start, stop in (shard_span(s, shard_size, len(rows)) for s in pending))
    progress = tqdm(total=total, desc=desc, unit="row", disable=True if quiet else None, file=sys.stderr)
    pool = None
    if workers == 1:
        _install(process, shard_size)
        results = map(_run_chunk, tasks)
    else:
        pool = ProcessPoolExecutor(workers, mp_context=_pool_context(), initializer=_install,
                                   initargs=(process, shard_size))
        results = _ordered_results(pool, tasks, window=4 * workers)
    try:
        collected = []
        for start, chunk_results in results:
            collected.extend((start + i, r) for i, r in enumerate(chunk_results))
            progress.update(len(chunk_results))
            shard = collected[0][0] // shard_size
            first, stop = shard_span(shard, shard_size, len(rows))
            if len(collected) == stop - first:
                _write_one_shard(out_dir, shard, rows, collected, options)
                collected = []
    finally:
        progress.close()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _ordered_results(pool: ProcessPoolExecutor, tasks, window: int):
    """`_run_chunk` results in task order, with at most `window` tasks in flight (the rows of a
    huge table are not all queued at once). A worker that dies (killed, out of memory, a crash in
    a decoder) stops the run with one line instead of hanging it; `--resume` continues it."""
    pending = deque()
    tasks = iter(tasks)
    for task in tasks:
        pending.append(pool.submit(_run_chunk, task))
        if len(pending) >= window:
            break
    while pending:
        try:
            result = pending.popleft().result()
        except BrokenProcessPool:
            raise UserError("a prep worker process died (killed, out of memory, or a crash in an image "
                            "decoder); the shards written so far are kept: rerun with --resume") from None
        for task in tasks:
            pending.append(pool.submit(_run_chunk, task))
            break
        yield result


def _describe(row):
    """The input row as it goes into failures.jsonl (dataclass rows, e.g. tables.BadRow, as dicts)."""
    return dataclasses.asdict(row) if dataclasses.is_dataclass(row) else row


def _write_one_shard(out_dir, shard, rows, collected, options):
    first_row = collected[0][0]
    shard_rows = rows[first_row:first_row + len(collected)]
    results = [result for _, result in collected]
    shards.write_shard(out_dir, shard, *shard_contents(shard, first_row, shard_rows, results, options))
