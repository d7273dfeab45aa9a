"""`mmssl index build --engine ray`: the rows of an IVF index are added by Ray tasks.

The driver trains the index on its sample exactly as the local build does, so every part shares
one coarse quantizer (and OPQ/PQ codebooks). The rows that are not held out are cut into
contiguous parts of whole add batches (`build.add_batches`, the batches the local add uses too);
each task deserialises a copy of the trained empty index, adds its part batch by batch and sends
the filled copy back serialised. The driver merges the copies in part order, shifting each
one's ids by the rows before it, so every inverted list holds the same entries in the same order
as after a local add: the index, and with it the tuned knob, held-out recall and every search
result, equals the local build's (on machines of one CPU kind: FAISS' float kernels are chosen
per CPU).

HNSW graphs (`hnsw_sq8`) cannot be merged and the exact `Flat` index has nothing to compute per
row, so those are added on the driver; index_info.json's `engine` says so and why. At most a few
parts per CPU (and at most IN_FLIGHT_BYTES of rows) are in flight at once, so the object store
and the driver hold a bounded share of the rows.
"""
from __future__ import annotations

import collections
import contextlib
import time

import numpy as np
from tqdm import tqdm

from eval.index.build import ADD_BATCH_ROWS, AddReport, AddRows, add_batches, add_locally, kept_rows, unit_rows
from eval.index.choose import IVF_KINDS, IndexPlan

PART_BATCHES = 8          # most add batches one task adds (128k rows: 256 MiB of 512-d float32)
PARTS_IN_FLIGHT_PER_CPU = 2
IN_FLIGHT_BYTES = 2 << 30 # and at most this much of the rows in the object store at once
LOCAL_REASONS = {
    "hnsw_sq8": "an HNSW graph cannot be merged from parts; it was built on the driver, which FAISS "
                "already spreads over all of the driver's cores",
    "flat": "an exact Flat index only copies the vectors; shipping them to the cluster costs more than the copy",
}


@contextlib.contextmanager
def rows_adder(engine: str, ray_address: str | None = None):
    """The `build_index(add_rows=...)` strategy of `--engine`; with ray, connected for the block."""
    if engine == "local":
        yield add_locally
        return
    from mmssl.engines import ray_session

    with ray_session(ray_address) as ray:
        yield ray_add_rows(ray)


def part_bounds(rows: int, cpus: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges over `rows` rows, each a run of whole add batches: one part
    per CPU while there are batches for it, more when a part would exceed PART_BATCHES."""
    batches = add_batches(rows)
    if not batches:
        return []
    parts = max(-(-len(batches) // PART_BATCHES), min(max(1, cpus), len(batches)), 1)
    edges = [len(batches) * i // parts for i in range(parts + 1)]
    return [(batches[first][0], batches[last - 1][1]) for first, last in zip(edges[:-1], edges[1:])]


def ray_add_rows(ray) -> AddRows:
    """An `AddRows` strategy that adds IVF parts as tasks on the cluster `ray` is connected to."""
    add_part = ray.remote(num_cpus=1)(_add_part)

    def add(index, plan: IndexPlan, vectors: np.ndarray, skip: np.ndarray, progress: bool = True) -> AddReport:
        if plan.kind not in IVF_KINDS:
            report = add_locally(index, plan, vectors, skip, progress)
            report.engine = {"name": "ray", "parallel_add": False, "reason": LOCAL_REASONS[plan.kind]}
            return report
        import faiss

        if index.ntotal != 0:
            raise ValueError("the parallel add starts from the trained, empty index")
        started = time.perf_counter()
        keep = kept_rows(len(vectors), skip)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        bounds = part_bounds(len(keep), cpus)
        empty = ray.put(serialized_empty(index))
        part_bytes = 4 * vectors.shape[1] * max(stop - start for start, stop in bounds)
        window = max(2, min(PARTS_IN_FLIGHT_PER_CPU * cpus, IN_FLIGHT_BYTES // part_bytes))
        pending, nodes, merge_s = collections.deque(), set(), 0.0
        bar = tqdm(total=len(bounds), desc=f"adding to {plan.factory} on Ray", unit="part", disable=not progress)

        def merge_next() -> None:
            nonlocal merge_s
            start, ref = pending.popleft()
            serialized, node = ray.get(ref)
            merging = time.perf_counter()
            merge_part(index, faiss.deserialize_index(serialized), offset=start)
            merge_s += time.perf_counter() - merging
            nodes.add(node)
            bar.update(1)

        for start, stop in bounds:
            while len(pending) >= window:
                merge_next()
            pending.append((start, add_part.remote(empty, ray.put(unit_rows(vectors[keep[start:stop]])))))
        while pending:
            merge_next()
        bar.close()
        engine = {"name": "ray", "parallel_add": True, "parts": len(bounds), "nodes": len(nodes),
                  "rows_per_part": [stop - start for start, stop in bounds]}
        return AddReport(engine, add_s=time.perf_counter() - started - merge_s, merge_s=merge_s)

    return add


def serialized_empty(index) -> np.ndarray:
    """The trained, empty IVF `index` as bytes for the tasks, with in-memory lists: the driver's may
    be on-disk lists (`--on-disk`), which name a file the tasks have no business opening."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    if not isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists):
        return faiss.serialize_index(index)
    lists, owned = ivf.invlists, ivf.own_invlists
    ivf.own_invlists = False        # keep the driver's lists alive while a stand-in is in place
    stand_in = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(stand_in, True)
    stand_in.this.disown()          # the index frees it when the driver's lists come back
    try:
        return faiss.serialize_index(index)
    finally:
        ivf.replace_invlists(lists, owned)


def merge_part(index, part, offset: int) -> None:
    """Append `part`'s inverted lists to `index`'s, its ids shifted by `offset` (the rows before it)."""
    import faiss

    if index.ntotal != offset:
        raise ValueError(f"parts must be merged in order: the index holds {index.ntotal} rows, the part starts at {offset}")
    ivf = faiss.extract_index_ivf(index)
    ivf.merge_from(faiss.extract_index_ivf(part), offset)
    index.ntotal = ivf.ntotal     # an OPQ wrapper (IndexPreTransform) does not see the inner merge


def _add_part(empty: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, str]:
    """Ray task: the trained empty index (serialised) with `rows` added, serialised; and the node."""
    import faiss
    import ray

    index = faiss.deserialize_index(empty)
    for start in range(0, len(rows), ADD_BATCH_ROWS):   # a part starts on a batch boundary
        index.add(np.ascontiguousarray(rows[start:start + ADD_BATCH_ROWS], dtype=np.float32))
    return faiss.serialize_index(index), ray.get_runtime_context().get_node_id()
