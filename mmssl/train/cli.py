"""`mmssl train --config FILE.yaml [section.key=value ...]` (also under torchrun: `-m mmssl train`)."""
from __future__ import annotations

import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a dual encoder (contrastive + optional heads) on webdataset shards",
        description="Train from a YAML config; trailing section.key=value pairs override it "
        "(e.g. data.train=DIR train.steps=300 train.precision=bf16 train.resume=latest).",
    )
    parser.add_argument("--config", default="tiny", help="YAML file, or a bundled config name (default: tiny)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    parser.set_defaults(func=run)


def run(args) -> int:
    from mmssl.config import load_config
    from mmssl.train.loop import TrainingDiverged, train

    cfg = load_config(args.config, args.overrides)
    try:
        result = train(cfg)
    except TrainingDiverged as err:
        sys.stderr.write(f"mmssl: error: {err}\n")
        return 1
    if result.checkpoint is not None and _is_main_process():
        sys.stderr.write(f"mmssl: trained {result.step} steps; checkpoint {result.checkpoint}\n")
    return 0


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"
