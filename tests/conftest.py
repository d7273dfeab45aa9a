"""Shared fixtures. Tests run on 2 CPU cores: keep torch to the cores we have, never download."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads (torch's and faiss' pools) sleep instead of spinning between parallel regions:
# on a shared 2-core box spinning made faiss' OPQ/PQ training ~4x slower in CPU time
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402  (after the environment above, which must be set before torch loads)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread beats two threads fighting over a 2-core machine.

    Use it in a module with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------- training on a synthetic world

@pytest.fixture(scope="module")
def micro_json(tmp_path_factory):
    """Path (str) of helpers.MICRO_MODEL written as a model config, for `model.name=` / `create_model`."""
    from helpers import write_micro_model

    return str(write_micro_model(tmp_path_factory.mktemp("models")))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """400 train / 48 val synthetic samples and the micro model config (`micro.json`), one per test
    module; `helpers.config(world, output, ...)` trains on it in seconds."""
    from helpers import write_micro_model
    from mmssl.cli import main

    root = tmp_path_factory.mktemp("train_world")
    assert main(["prep", "synthetic", "--out", str(root / "syn"), "--num-train", "400", "--num-val", "48",
                 "--quiet"]) == 0
    write_micro_model(root)
    return root


# ---------------------------------------------------------------- the search service

@pytest.fixture(scope="module")
def index_dir(request, tmp_path_factory):
    """A search index over the requesting module's `NUM_ITEMS` synthetic val images (default 40)."""
    from helpers import build_index

    return build_index(tmp_path_factory.mktemp(request.module.__name__), getattr(request.module, "NUM_ITEMS", 40))


@pytest.fixture(scope="module")
def searcher(index_dir):
    from eval.index.search import Searcher

    return Searcher.open(str(index_dir))


@pytest.fixture(scope="module")
def server(searcher):
    """Base URL of the app for `searcher`, default options, served in a thread on a loopback port."""
    from helpers import serving

    with serving(searcher) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    import httpx

    with httpx.Client(base_url=server, timeout=30) as http:
        yield http


# ---------------------------------------------------------------- caption-free images

@pytest.fixture(scope="module")
def plain_images(tmp_path_factory):
    """48 caption-free images sharded by `mmssl prep folder` (images layout), for image-only training."""
    import numpy as np
    from PIL import Image

    from mmssl.cli import main

    root = tmp_path_factory.mktemp("plain")
    for i in range(48):
        pixels = np.random.default_rng(i).integers(0, 256, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img{i:03d}.png")
    assert main(["prep", "folder", "--input", str(root), "--out", str(root / "shards"), "--image-size", "32",
                 "--quiet"]) == 0
    return root / "shards"


# ---------------------------------------------------------------- a Ray cluster on this machine

@pytest.fixture(scope="session")
def ray_cluster():
    """A real 2-node Ray cluster on this machine (`ray.cluster_utils.Cluster`, 1 CPU per node),
    started once for the whole run and joined by this process: `--engine ray` commands run in it
    (mmssl.engines.ray_session uses an initialised Ray as it is). Yields the Cluster."""
    if os.environ.get("CI"):
        import ray  # CI installs the test extra, which has Ray: missing is a failure, not a skip
    else:
        ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, logging_level="WARNING")
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
