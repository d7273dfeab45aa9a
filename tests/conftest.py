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
