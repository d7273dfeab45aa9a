"""Benchmark `prep csv` (512 px JPEGs -> 256 px shards) and `prep synthetic`; prints one JSON object.

The anchor, measured in the same run on the same files, is the plain loop a script would write:
one process, full decode, Lanczos resize, encode. Machines differ and are often shared, so the
ratio to that anchor is the portable figure. Besides wall-clock rates, every stage reports its
rate per CPU-second (parent and worker processes together), which a busy machine disturbs far
less; `..._projected_on_2_free_cores` is that rate times two.

    python bench/prep.py [--images 1500] [--workers 2] [--synthetic 20000]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data_prep import csv_source, synthetic


def photo_like(rng, side: int) -> Image.Image:
    """Smooth colour fields, a few shapes and sensor-like noise: JPEG work close to a real photo
    (about 70 KB at 512 px, quality 90, like an average ImageNet photo)."""
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((side, side), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.integers(0, side, 2)
        r = int(rng.integers(side // 16, side // 4))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (side, side, 3), dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_inputs(folder: Path, count: int, side: int) -> Path:
    rng = np.random.default_rng(0)
    lines = ["image,caption"]
    for i in range(count):
        photo_like(rng, side).save(folder / f"{i:05d}.jpg", quality=90)
        lines.append(f"{i:05d}.jpg,generated picture {i}")
    table = folder / "images.csv"
    table.write_text("\n".join(lines) + "\n")
    return table


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (pool workers are joined on exit)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(count: int, work) -> dict:
    wall, cpu = time.perf_counter(), _cpu_seconds()
    work()
    wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
    return {"per_s": round(count / wall, 1), "per_cpu_s": round(count / cpu, 1)}


def naive_loop(paths: list[Path], size: int) -> None:
    """The straightforward single-process decode -> resize -> encode loop (the anchor)."""
    for path in paths:
        with Image.open(path) as image:
            resized = image.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
        resized.save(io.BytesIO(), "JPEG", quality=95)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--synthetic", type=int, default=20000, help="synthetic train samples to render")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="mmssl-bench-prep-") as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        table = make_inputs(tmp / "in", args.images, 512)
        anchor_paths = sorted((tmp / "in").glob("*.jpg"))[:300]
        anchor = timed(len(anchor_paths), lambda: naive_loop(anchor_paths, 256))
        prep = timed(args.images, lambda: csv_source.prepare(
            table, tmp / "shards", image_size=256, workers=args.workers, quiet=True))
        assert json.loads((tmp / "shards" / "manifest.json").read_text())["num_samples"] == args.images
        sizes = dict(num_train=args.synthetic, num_val=max(1, args.synthetic // 10))
        total = sizes["num_train"] + sizes["num_val"] + sizes["num_val"] // 4
        world = timed(total, lambda: synthetic.generate(tmp / "world", workers=args.workers, quiet=True, **sizes))
    print(json.dumps({
        "bench": "prep",
        "cpu_count": os.cpu_count(),
        "load_average_at_start": round(load_before, 2),
        "workers": args.workers,
        "csv_images": args.images,
        "csv_work": "512px JPEG q90 -> 256px border, JPEG q95, 1000-sample shards",
        "prep_csv_images_per_s": prep["per_s"],
        "prep_csv_images_per_cpu_s": prep["per_cpu_s"],
        "prep_csv_projected_on_2_free_cores": round(2 * prep["per_cpu_s"], 1),
        "anchor_naive_loop_images_per_s": anchor["per_s"],
        "anchor_naive_loop_images_per_cpu_s": anchor["per_cpu_s"],
        "speedup_vs_anchor_wall": round(prep["per_s"] / anchor["per_s"], 2),
        "speedup_vs_anchor_per_cpu_s": round(prep["per_cpu_s"] / anchor["per_cpu_s"], 2),
        "csv_target_images_per_s": 250,
        "synthetic_samples": total,
        "synthetic_samples_per_s_64px": world["per_s"],
        "synthetic_samples_per_cpu_s_64px": world["per_cpu_s"],
        "synthetic_projected_on_2_free_cores": round(2 * world["per_cpu_s"], 1),
        "synthetic_target_samples_per_s": 2000,
    }))


if __name__ == "__main__":
    main()
