"""Samples/s of the training loader alone (decode + transform + tokenise + batch), no model.

Tells the trainer the data-side ceiling. Anchor, measured in the same run on the same shards:
open_clip's webdataset pipeline shape (tarfile_to_samples -> shuffle -> decode("pilrgb") ->
preprocess / tokenise per sample -> batched) with the same transform, tokenizer and workers.
Prints one JSON object.

    python bench/data_throughput.py [--samples 2000] [--batch-size 128] [--workers 0 1 2] [--epochs 3]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_shards(folder: Path, samples: int) -> Path:
    subprocess.run(
        [sys.executable, "-m", "mmssl", "prep", "synthetic", "--out", str(folder), "--num-train", str(samples),
         "--num-val", "8", "--num-heldout", "8", "--image-size", "64", "--quiet", "--workers", "2"],
        check=True, stdout=subprocess.DEVNULL,
    )
    return folder / "train"


def tiny_model_preprocessing():
    """The transform and tokenizer the tiny config trains with (open_clip's, 64 px, context 32)."""
    import mmssl
    from mmssl.models import image_transform

    model = mmssl.create_model("tiny-vit-64")
    return image_transform(model, train=False), model.tokenizer


def samples_per_second(batches, epochs_samples: int, batch_size: int) -> float:
    """Throughput after the first batch (worker start-up and buffer fill excluded)."""
    iterator = iter(batches)
    next(iterator)
    start, seen = time.perf_counter(), 0
    while seen < epochs_samples - batch_size:
        seen += len(next(iterator)[0])
    return seen / (time.perf_counter() - start)


def mmssl_loader(train: Path, transform, tokenizer, batch_size: int, workers: int):
    from mmssl.data import TrainLoader

    return TrainLoader(train, transform=transform, tokenizer=tokenizer, batch_size=batch_size, seed=0,
                       num_workers=workers, shuffle_buffer=1000, decode_size=64, rank=0, world_size=1)


def open_clip_style_loader(train: Path, transform, tokenizer, batch_size: int, workers: int):
    import webdataset as wds

    from mmssl.data import resolve_shards

    urls = [shard.url for shard in resolve_shards(train)]
    pipeline = wds.DataPipeline(
        wds.ResampledShards(urls),
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(1000, initial=1000),
        wds.decode("pilrgb", handler=wds.warn_and_continue),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map_dict(image=transform, text=lambda text: tokenizer(text)[0]),
        wds.to_tuple("image", "text"),
        wds.batched(batch_size, partial=False),
    )
    return wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=workers,
                         persistent_workers=workers > 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    transform, tokenizer = tiny_model_preprocessing()
    result = {"samples": args.samples, "batch_size": args.batch_size, "image_size": 64, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        train = make_shards(Path(tmp), args.samples)
        total = args.epochs * (args.samples // args.batch_size) * args.batch_size
        for workers in args.workers:
            ours = samples_per_second(
                mmssl_loader(train, transform, tokenizer, args.batch_size, workers), total, args.batch_size)
            anchor = samples_per_second(
                open_clip_style_loader(train, transform, tokenizer, args.batch_size, workers), total, args.batch_size)
            result["runs"][f"workers={workers}"] = {
                "mmssl_samples_per_s": round(ours, 1),
                "open_clip_style_samples_per_s": round(anchor, 1),
                "ratio": round(ours / anchor, 3),
            }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
