"""Where batch work runs: `local` (this process and its worker processes) or `ray` (tasks and actors
on a Ray cluster). One home for the `--engine` / `--ray-address` flags and for joining a cluster.

The local engine is the default and needs no Ray. With `--engine ray`, `ray_session` joins the
cluster at `--ray-address`, else `RAY_ADDRESS`, else starts a Ray on this machine; a Ray already
initialised in this process (a test's `ray.cluster_utils.Cluster`) is used as it is. Commands that
offer the flag promise the same outputs on both engines: the work is cut into the same units (one
output shard, one embedding part, one sub-index) and only where each unit runs differs.
"""
from __future__ import annotations

import argparse
import contextlib
import os

from mmssl.errors import UserError

ENGINES = ("local", "ray")


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=ENGINES, default="local",
                        help="local: this machine's processes (default); ray: tasks on a Ray cluster")
    parser.add_argument("--ray-address", default=None,
                        help="with --engine ray: the cluster to join (default: $RAY_ADDRESS, else a Ray "
                             "started on this machine)")


def import_ray():
    """The `ray` module, or a one-line UserError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError("--engine ray needs Ray: pip install 'mmssl[ray]' (or pip install 'ray>=2.9')") from None
    return ray


@contextlib.contextmanager
def ray_session(address: str | None = None):
    """`ray`, connected for the duration of the block; a Ray this block started is shut down after."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=True, logging_level="WARNING",
                 configure_logging=True)
    except (ConnectionError, ValueError, RuntimeError) as err:
        where = address or "a local Ray"
        raise UserError(f"cannot start or join {where}: {str(err).splitlines()[0] if str(err) else err}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def ray_get(ray, ref):
    """`ray.get(ref)`; a UserError raised inside the task or actor (a full disk, a bad input) comes
    back as that same one line. Any other failure is Ray's exception, for the caller to word."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        if isinstance(getattr(err, "cause", None), UserError):
            raise UserError(str(err.cause)) from None
        raise


def ray_resources(ray) -> dict:
    """The cluster's total resources (CPU, GPU, memory ...), as Ray reports them."""
    return dict(ray.cluster_resources())
