"""`mmssl prep csv|folder|coco|synthetic|export-clip-benchmark`: parsers only; the work lives in the sibling modules."""
from __future__ import annotations

import argparse
import os

from data_prep.samples import DEFAULT_MAX_IMAGE_PIXELS, RESIZE_MODES
from mmssl.arg_types import non_negative_int, positive_int
from mmssl.engines import add_engine_options


SHIFT_NAMES = "noise,blur,background"  # data_prep.synthetic.SHIFTS, named here to keep numpy out of parsing


def _shift_names(text: str) -> tuple:
    """`--shifts` text -> names; an unknown name is argparse's one-line usage error."""
    names = () if text.strip().lower() == "none" else tuple(n.strip() for n in text.split(",") if n.strip())
    for name in names:
        if name not in SHIFT_NAMES.split(","):
            raise argparse.ArgumentTypeError(f"unknown shift {name!r}, expected names from {SHIFT_NAMES} or none")
    return names


def _quality(text: str) -> int:
    value = positive_int(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"JPEG quality must be 1..100, got {value}")
    return value


def _add_output_options(parser: argparse.ArgumentParser, shard_size: int = 1000) -> None:
    parser.add_argument("--out", required=True, help="output folder (shards, manifest.json, failures.jsonl)")
    parser.add_argument("--shard-size", type=positive_int, default=shard_size, help="rows per shard")
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                        help="worker processes of the local engine (unused with --engine ray: one task per shard)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="keep finished shards of an interrupted run")
    mode.add_argument("--overwrite", action="store_true", help="replace the shards already in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_engine_options(parser)  # ray: each shard is a task writing into --out, which every node must see


def _add_image_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image-size", type=positive_int, default=256, help="output side in pixels")
    parser.add_argument("--resize-mode", choices=RESIZE_MODES, default="border",
                        help="border: keep ratio, pad to a square (img2dataset default); center_crop: "
                             "fill the square and crop; keep_ratio: shorter side = size; no: keep as is")
    parser.add_argument("--quality", type=_quality, default=95, help="JPEG quality of the shard images")
    parser.add_argument("--max-image-pixels", type=positive_int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="an image, or its resized version, with more pixels is a failure, never decoded "
                             "(default: PIL's decompression-bomb limit, %(default)s)")


def _output_kwargs(args) -> dict:
    return dict(shard_size=args.shard_size, workers=args.workers, resume=args.resume,
                overwrite=args.overwrite, quiet=args.quiet, engine=args.engine, ray_address=args.ray_address)


def _image_kwargs(args) -> dict:
    return dict(image_size=args.image_size, resize_mode=args.resize_mode, quality=args.quality,
                max_image_pixels=args.max_image_pixels)


def _print_summary(kind: str, manifest: dict, out) -> None:
    from data_prep.pipeline import summary_line

    print(summary_line(f"prep {kind}", manifest, out))


def run_synthetic(args) -> int:
    from data_prep import synthetic

    manifests = synthetic.generate(
        args.out, num_train=args.num_train, num_val=args.num_val, num_heldout=args.num_heldout,
        num_binding=args.num_binding, num_labelled=args.num_labelled, shifts=args.shifts, image_size=args.image_size, seed=args.seed,
        **_output_kwargs(args),
    )
    for split, manifest in manifests.items():
        _print_summary(f"synthetic {split}", manifest, os.path.join(args.out, split))
    return 0


def run_csv(args) -> int:
    from data_prep import csv_source

    manifest = csv_source.prepare(
        args.input, args.out, image_root=args.image_root, image_col=args.image_col,
        caption_col=args.caption_col, **_image_kwargs(args), **_output_kwargs(args),
    )
    _print_summary("csv", manifest, args.out)
    return 0


def run_folder(args) -> int:
    from data_prep import folder

    manifest = folder.prepare(
        args.input, args.out, layout=args.layout, classnames_file=args.classnames,
        templates_file=args.templates, **_image_kwargs(args), **_output_kwargs(args),
    )
    _print_summary("folder", manifest, args.out)
    return 0


def run_coco(args) -> int:
    from data_prep import coco

    manifest = coco.prepare(args.captions, args.images, args.out, **_image_kwargs(args), **_output_kwargs(args))
    _print_summary("coco", manifest, args.out)
    return 0


def run_export_clip_benchmark(args) -> int:
    from data_prep import clip_benchmark_export

    summary = clip_benchmark_export.export(args.data, args.out, split=args.split, dataset_type=args.dataset_type,
                                           shard_size=args.shard_size, overwrite=args.overwrite, quiet=args.quiet)
    print(clip_benchmark_export.summary_line(summary))
    return 0


def register(subparsers) -> None:
    prep = subparsers.add_parser("prep", help="turn raw data into webdataset shards")
    modes = prep.add_subparsers(dest="prep_mode", metavar="MODE")
    modes.required = True

    synthetic = modes.add_parser("synthetic", help="render the embedded synthetic world "
                                                   "(train/val/heldout/binding/labelled/shift_*)")
    synthetic.add_argument("--num-train", type=positive_int, default=20000)
    synthetic.add_argument("--num-val", type=positive_int, default=2000)
    synthetic.add_argument("--num-heldout", type=positive_int, default=None, help="default: num-val / 4")
    synthetic.add_argument("--num-binding", type=non_negative_int, default=None,
                           help="two-object scenes with attribute-swapped negative captions, for "
                                "`mmssl eval caption-selection` (default: num-val / 4; 0: no binding split)")
    synthetic.add_argument("--num-labelled", type=non_negative_int, default=None,
                           help="class-balanced labelled one-object scenes of the seen pairs, the training set of "
                                "`mmssl finetune` and few-shot probes (default: num-val; 0: no labelled split)")
    synthetic.add_argument("--shifts", type=_shift_names, default=SHIFT_NAMES,
                           help="comma-separated shifted copies of val to write as shift_NAME, for robustness: "
                                "noise (Gaussian pixel noise), blur (Gaussian blur), background (unseen "
                                "textures); 'none' or '' writes none (default: %(default)s)")
    synthetic.add_argument("--image-size", type=positive_int, default=64)
    synthetic.add_argument("--seed", type=int, default=0)
    _add_output_options(synthetic)
    synthetic.set_defaults(func=run_synthetic)

    table = modes.add_parser("csv", help="a CSV/TSV/JSONL/parquet table of image paths and captions")
    table.add_argument("--input", required=True, help="table file: .csv, .tsv, .jsonl or .parquet")
    table.add_argument("--image-root", default=None, help="folder that relative image paths start from "
                                                         "(default: the table's folder)")
    table.add_argument("--image-col", default="image")
    table.add_argument("--caption-col", default="caption")
    _add_image_options(table)
    _add_output_options(table)
    table.set_defaults(func=run_csv)

    images = modes.add_parser("folder", help="an image folder: sidecar .txt captions or class sub-folders")
    images.add_argument("--input", required=True, help="image folder")
    images.add_argument("--layout", choices=("auto", "captions", "classes", "images"), default="auto",
                        help="captions: IMAGE + IMAGE.txt; classes: CLASS/IMAGE (label + classname); "
                             "images: no captions (image-only training); auto: captions if any .txt "
                             "caption exists, else classes if there are sub-folders, else images")
    images.add_argument("--classnames", default=None,
                        help="classes layout: readable names, one per line, in sorted sub-folder order")
    images.add_argument("--templates", default=None, help="classes layout: zero-shot templates file with {}")
    _add_image_options(images)
    _add_output_options(images)
    images.set_defaults(func=run_folder)

    captions = modes.add_parser("coco", help="COCO-captions JSON (images + annotations)")
    captions.add_argument("--captions", required=True, help="captions_*.json")
    captions.add_argument("--images", required=True, help="folder holding the images' file_name paths")
    _add_image_options(captions)
    _add_output_options(captions)
    captions.set_defaults(func=run_coco)

    benchmark = modes.add_parser("export-clip-benchmark",
                                 help="write mmssl shards in CLIP_benchmark's webdataset layout (wds/NAME)")
    benchmark.add_argument("--data", required=True, help="mmssl shards (a folder with manifest.json, or a pattern)")
    benchmark.add_argument("--out", required=True, help="the CLIP_benchmark folder (OUT/SPLIT/0.tar ..., nshards.txt, "
                                                        "classnames.txt, zeroshot_classification_templates.txt, "
                                                        "dataset_type.txt); other splits already there are kept")
    benchmark.add_argument("--split", default="test", help="split folder to write (default: test)")
    benchmark.add_argument("--dataset-type", choices=("auto", "classification", "retrieval"), default="auto",
                           help="auto: classification when every sample has a label, else retrieval")
    benchmark.add_argument("--shard-size", type=positive_int, default=10_000, help="samples per shard")
    benchmark.add_argument("--overwrite", action="store_true",
                           help="replace the split (and top-level files with other content) already in --out")
    benchmark.add_argument("--quiet", action="store_true", help="no progress bar")
    benchmark.set_defaults(func=run_export_clip_benchmark)
