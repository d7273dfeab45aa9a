"""Helpers shared by several test modules: constants and plain functions (the fixtures built on
them, `world` and the serve fixtures, are in conftest.py).

Import them as `from helpers import ...`: pytest puts tests/ on sys.path (like `image_bytes` and
`fault_harness`), and no test module imports another `test_*.py` module.
"""
from __future__ import annotations

import copy
import functools
import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

import pytest

from mmssl.config import load_config
from mmssl.train.distributed import DistEnv
from mmssl.train.metrics import read_metrics

# ---------------------------------------------------------------- anchors: the tools we interoperate with

# isolated installs of the tools whose unmodified code the tests run against (`.ci/run` makes them
# with `pip install --no-deps --target`; never importable from our own environment)
ANCHORS = Path(os.environ.get("MMSSL_ANCHORS", Path(__file__).resolve().parents[1] / ".anchors"))
ANCHOR_PACKAGES = {"clip_retrieval": "clip-retrieval==2.45.0",
                   "clip_benchmark": "clip_benchmark==1.6.2 pycocoevalcap==1.2"}


def anchor(name: str) -> Path:
    """The folder of the isolated install `name` (a key of ANCHOR_PACKAGES). Missing: the test is
    skipped on a developer's machine, and fails under CI, which always installs them."""
    folder = ANCHORS / name
    if not (folder / name).is_dir():
        install = f"pip install --no-deps --target {folder} {ANCHOR_PACKAGES[name]}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"anchor {name} is not installed at {folder} (.ci/run runs: {install})")
        pytest.skip(f"anchor {name} not installed ({install})")
    return folder


# ---------------------------------------------------------------- the micro model and training

# a ViT and text transformer small enough that a training step takes milliseconds on a CPU
MICRO_MODEL = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def micro_model_config(vision: dict | None = None, text: dict | None = None) -> dict:
    """A fresh copy of MICRO_MODEL with some `vision_cfg` / `text_cfg` keys changed."""
    cfg = copy.deepcopy(MICRO_MODEL)
    cfg["vision_cfg"].update(vision or {})
    cfg["text_cfg"].update(text or {})
    return cfg


def write_micro_model(folder: Path, cfg: dict | None = None, name: str = "micro.json") -> Path:
    """FOLDER/NAME holding the model config (default MICRO_MODEL), for `model.name=` / `create_model`."""
    path = Path(folder) / name
    path.write_text(json.dumps(MICRO_MODEL if cfg is None else cfg))
    return path


def write_micro_checkpoint(path: Path, seed: int = 0) -> Path:
    """PATH: an mmssl checkpoint of MICRO_MODEL (config written beside it as micro.json), random
    init from `seed`: the cheapest model `mmssl eval` and `mmssl export` take."""
    import mmssl
    from mmssl.config import ExperimentConfig, ModelConfig, to_dict

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    model_cfg = ModelConfig(name=str(write_micro_model(Path(path).parent).resolve()))
    torch.manual_seed(seed)
    model = mmssl.create_model(model_cfg)
    torch.save({"model": model.state_dict(), "config": to_dict(ExperimentConfig(model=model_cfg)), "heads": {},
                "step": 0}, path)
    return Path(path)


def micro_overrides(world: Path, output) -> list:
    """The overrides that shrink the tiny config to seconds on a `world` folder (see conftest.py):
    micro model, batch 16, one thread, no periodic validation, no checkpoints."""
    return [f"model.name={world / 'micro.json'}", f"data.train={world / 'syn' / 'train'}", "data.val=null",
            "data.workers=2", "data.shuffle_buffer=64", f"train.output={output}", "train.batch_size=16",
            "train.warmup=5", "train.log_every=1", "train.save_every=0", "train.precision=fp32",
            "train.threads=1", "train.lr=0.001"]


def config(world: Path, output, *extra):
    """The tiny config shrunk to seconds: micro model, batch 16, one thread, in-process decoding."""
    return load_config("tiny", [*micro_overrides(world, output), *extra])


def logged_losses(output: Path) -> list:
    return [(r["step"], r["loss"]) for r in read_metrics(output / "metrics.jsonl")]


def assert_resumes_exactly(make_config, reference: Path, straight, output: Path, steps: int = 6) -> None:
    """A run of `make_config(output, *overrides)` stopped at steps // 2 and resumed from its checkpoint
    reproduces `straight` (the uninterrupted run that wrote `reference`): losses and metrics.jsonl."""
    from mmssl.train.loop import build_trainer, train

    half = steps // 2
    first = build_trainer(make_config(output, f"train.steps={steps}", f"train.save_every={half}"), CPU)
    first.cfg.steps = half
    first.fit()
    resumed = train(make_config(output, f"train.steps={steps}", "train.resume=latest"))
    assert resumed.losses == straight.losses[half:]
    assert logged_losses(output) == logged_losses(reference)


TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
needs_torchrun = pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(TORCHRUN),
                                    reason="torchrun not installed")


def torchrun_mmssl_train(overrides: list, timeout: float = 120) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 -m mmssl train --config tiny OVERRIDES`, one
    thread per process (2 processes on 2 cores), output captured."""
    return subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "mmssl", "train",
                           "--config", "tiny", *overrides], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=timeout)


def close_process_group() -> None:
    """End a gloo worker: every rank reaches the barrier before any tears its group down (a rank that
    destroys its group while a peer still finishes a send can abort: "terminate called without an
    active exception", seen in CI)."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def assert_accumulates_to_the_same_losses(make_config, straight, output: Path, steps: int, accum_steps: int = 2,
                                          rel: float = 1e-4) -> None:
    """`make_config(output, ...)` trained for `steps` in `accum_steps` micro-batches logs the losses of
    `straight` (the same run in whole batches)."""
    from mmssl.train.loop import train

    split = train(make_config(output, f"train.steps={steps}", f"train.accum_steps={accum_steps}"))
    assert split.losses == pytest.approx(straight.losses, rel=rel)


def objective_for(model_name, *overrides):
    """An `mmssl.objective.Objective` in training mode for a model config and loss/heads overrides, seed 0."""
    import mmssl
    from mmssl.config import load_config
    from mmssl.objective import Objective

    cfg = load_config(None, [f"model.name={model_name}", *overrides])
    torch.manual_seed(0)
    return Objective(mmssl.create_model(cfg.model).train(), cfg), cfg


def accumulation_matches(objective, images, texts, pieces=(3, 4), views=None) -> dict:
    """Terms and gradients of one step split into each of `pieces` micro-batches equal those of the
    whole-batch step; returns the whole step's gradients (parameter name -> tensor)."""
    from mmssl.train.accumulate import accumulated_backward

    def step(count):
        objective.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        if count == 1:
            terms = objective(images, texts, step=0, views=views)
            terms["loss"].backward()
        else:
            terms = accumulated_backward(objective, images, texts, count, step=0, views=views)
        grads = {name: p.grad.clone() for name, p in objective.named_parameters() if p.grad is not None}
        return {name: value.detach() for name, value in terms.items()}, grads

    full_terms, full = step(1)
    for count in pieces:
        terms, split = step(count)
        assert terms.keys() == full_terms.keys()
        for name, value in full_terms.items():
            torch.testing.assert_close(terms[name], value, rtol=1e-5, atol=1e-6, msg=name)
        assert split.keys() == full.keys()
        for name, grad in full.items():
            scale = grad.abs().max().item()
            torch.testing.assert_close(split[name], grad, rtol=1e-4, atol=max(1e-5 * scale, 1e-8), msg=name)
    return full


def token_batch(rows: int = 12, size: int = 32, context: int = 16):
    """(images [rows, 3, size, size], captions [rows, context]): random token ids between SOT and EOT
    at random lengths, padding after; a fixed seed."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(rows, 3, size, size, generator=generator)
    texts = torch.randint(1, 49000, (rows, context), generator=generator)
    texts[:, 0] = 49406
    lengths = torch.randint(3, context - 2, (rows,), generator=generator)
    for row, length in enumerate(lengths.tolist()):
        texts[row, length], texts[row, length + 1:] = 49407, 0
    return images, texts


# ---------------------------------------------------------------- shards and loaders

def jpeg_bytes(seed: int, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_shards(folder: Path, sizes, manifest=True, stats=False, prefix="", corrupt=(), captions_json=False):
    """Tiny img2dataset-like shards: keys `{prefix}{shard:05d}{i:04d}`; `corrupt` keys get bad jpg bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for shard, size in enumerate(sizes):
        name = f"{shard:05d}.tar"
        with wds.TarWriter(str(folder / name)) as sink:
            for i in range(size):
                key = f"{prefix}{shard:05d}{i:04d}"
                meta = {"label": (shard * 7 + i) % 5, "key": key}
                sample = {"__key__": key, "jpg": jpeg_bytes(shard * 1000 + i)}
                if captions_json:
                    meta["captions"] = [f"{key} caption {c}" for c in range(3)]
                else:
                    sample["txt"] = f"caption of {key}"
                sample["json"] = json.dumps(meta)
                if key in corrupt:
                    sample["jpg"] = b"not a jpeg"
                sink.write(sample)
        if stats:
            (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": size, "successes": size}))
        entries.append({"url": name, "count": size})
    if manifest:
        (folder / "manifest.json").write_text(json.dumps({"shards": entries, "total": sum(sizes)}))
    return folder


def to_tensor(image):
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def length_tokenizer(captions):
    """Stands in for model.tokenizer: one row per caption, deterministic content."""
    return torch.tensor([[len(c), sum(map(ord, c)) % 1000] for c in captions])


class QuietFolderHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files of a folder without logging every request to stderr."""

    def log_message(self, *args):
        pass


@contextmanager
def http_server(handler=QuietFolderHandler, directory=None):
    """Base URL of a loopback HTTP server: `handler` (a BaseHTTPRequestHandler class), given
    `directory` when there is one (a folder served as a remote dataset or image host looks)."""
    factory = functools.partial(handler, directory=str(directory)) if directory is not None else handler
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), factory)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    """A loopback TCP port nobody listens on now (for a gloo process group's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- the command line

def exit_code(argv: list) -> int:
    """`mmssl ARGV`'s status in this process, whether main() returns it or argparse exits with it."""
    from mmssl.cli import main

    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


# ---------------------------------------------------------------- search index and service

CHROMIUM = "/usr/bin/chromium"      # Debian's (.ci/run installs it); without the network flags it
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run")   # dials Google at start

INDEX_MODEL = "openclip:tiny-vit-64"   # random-init open_clip model: embeds in milliseconds


def build_index(root: Path, num_items: int, modality: str = "image", name: str = "index") -> Path:
    """ROOT/NAME: a search index over the `num_items` val images of a synthetic world in ROOT/data
    (made on first use); `modality="image,text"` also indexes their captions."""
    from mmssl.cli import main

    if not (root / "data" / "val").is_dir():
        assert main(["prep", "synthetic", "--out", str(root / "data"), "--num-train", "8",
                     "--num-val", str(num_items), "--num-heldout", "4", "--quiet"]) == 0
    assert main(["index", "build", "--checkpoint", INDEX_MODEL, "--data", str(root / "data" / "val"),
                 "--out", str(root / name), "--workers", "0", "--modality", modality]) == 0
    return root / name


@contextmanager
def serving(searcher, host="127.0.0.1", **options):
    """Base URL of `create_app(searcher, ServeOptions(**options))` served by uvicorn in a thread, on
    a free port of HOST, through the socket `mmssl serve` listens on."""
    import uvicorn

    from eval.serve import _bind
    from eval.serve.app import create_app
    from eval.serve.options import ServeOptions

    app = create_app(searcher, ServeOptions(bind_host=host, **options))
    sock = _bind(host, 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    port = sock.getsockname()[1]
    try:
        yield f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def colour_class_folders(root: Path, noise: float, size: int, counts=(("train", 10), ("test", 4)),
                         split_in_name: bool = False) -> Path:
    """ROOT/<split>/<class>/ ImageNet-style trees of noisy solid-colour PNGs, 3 classes (red_thing,
    green_thing, blue_thing), `noise` the pixel std, seed 0."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = {"red_thing": (220, 30, 30), "green_thing": (30, 200, 40), "blue_thing": (30, 40, 220)}
    for split, count in counts:
        for name, colour in colours.items():
            (root / split / name).mkdir(parents=True)
            for index in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, noise, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / (f"{split}_{index}.png" if split_in_name else f"{index}.png"))
    return root
