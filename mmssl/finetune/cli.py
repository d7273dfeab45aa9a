"""`mmssl finetune`: adapt a pretrained checkpoint to a labelled task (`mmssl wise`: mmssl.finetune.wise_cli).

    mmssl finetune --checkpoint CKPT --train DIR --val DIR --out RUN [--objective ce|contrastive]
                   [--wise 0,0.1,...,1 [--shift DIR ...]] [section.key=value ...]
    mmssl wise --zeroshot CKPT --finetuned CKPT --alpha A --out FILE.pt

Fine-tuning runs the training loop (`mmssl.train.loop.Trainer`: optimizer, schedule, precision,
checkpoints, exact resume, metrics, torchrun) on `mmssl.finetune.objective.FinetuneObjective`.
Keys are those of `mmssl train` (configs/finetune.yaml holds the defaults) plus the `finetune`
section; `model.lock_image=true model.lock_image_unlocked_groups=N` freezes all but the last N
layer groups of the image tower. A class-folder tree given as --train is sharded once into
RUN/train_shards (`mmssl prep folder`), since training reads shards for exact resume.
"""
from __future__ import annotations

import argparse
import sys

from mmssl.arg_types import non_negative_int, positive_int

MAX_ALPHAS = 101


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "finetune", help="fine-tune a checkpoint's image tower on labelled data (CE, LP-FT, FLYP; WiSE-FT)",
        description="Fine-tune from a zero-shot head; trailing section.key=value pairs override "
                    "configs/finetune.yaml (e.g. train.steps=300 train.lr=1e-4 finetune.lp_steps=50).")
    parser.add_argument("--checkpoint", required=True, help="mmssl checkpoint (.pt or run folder), or openclip:NAME[:WEIGHTS]")
    parser.add_argument("--train", required=True, help="labelled shards (json 'label' or .cls), or a class-folder tree")
    parser.add_argument("--val", required=True, help="labelled validation set (shards, CLIP_benchmark folder or class folders)")
    parser.add_argument("--out", required=True, help="run folder (checkpoints, metrics.jsonl, wise/)")
    parser.add_argument("--config", default="finetune", help="YAML file, or a bundled config name (default: finetune)")
    parser.add_argument("--objective", choices=("ce", "contrastive"), help="sets finetune.objective")
    parser.add_argument("--classnames", help="FILE, or imagenet|cifar10|cifar100 (default: TRAIN/classnames.txt, "
                                             "else the class folder names)")
    parser.add_argument("--templates", help="FILE or openai|simple (default: TRAIN/templates.txt, else openai)")
    parser.add_argument("--wise", type=alphas, help="after training, evaluate WiSE-FT at these alphas "
                                                    "(comma list in [0, 1], e.g. 0,0.1,...,1 or 0:1:0.1)")
    parser.add_argument("--shift", action="append", default=[], metavar="DIR",
                        help="a shifted labelled set the WiSE-FT curve is also scored on (repeatable)")
    parser.add_argument("--wise-alpha", type=alpha_value, default=0.5,
                        help="alpha of the WiSE-FT checkpoint written to RUN/wise/ (default 0.5)")
    parser.add_argument("--eval-batch-size", type=positive_int, default=256)
    parser.add_argument("--workers", type=non_negative_int, default=2, help="eval data loader processes")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    parser.set_defaults(func=run)



def alpha_value(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"alpha must be in [0, 1], got {text}")
    return value


def alphas(text: str) -> list[float]:
    """'0,0.5,1' or 'start:stop:step' (inclusive) -> sorted unique alphas in [0, 1]."""
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"a range is start:stop:step, got {text!r}")
        start, stop, step = (alpha_value(part) if i < 2 else _positive_float(part) for i, part in enumerate(parts))
        count = int(round((stop - start) / step)) + 1
        if count > MAX_ALPHAS or count < 1:
            raise argparse.ArgumentTypeError(f"{text!r} gives {count} alphas (1..{MAX_ALPHAS})")
        values = [round(start + i * step, 10) for i in range(count)]
    else:
        values = [alpha_value(part) for part in text.split(",") if part.strip()]
    if not values or len(values) > MAX_ALPHAS:
        raise argparse.ArgumentTypeError(f"give 1 to {MAX_ALPHAS} alphas, got {len(values)}")
    return sorted(set(values))


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"the step must be > 0, got {text}")
    return value


def run(args) -> int:
    from mmssl.finetune.run import finetune
    from mmssl.train.loop import TrainingDiverged

    try:
        result = finetune(args)
    except TrainingDiverged as err:
        sys.stderr.write(f"mmssl: error: {err}\n")
        return 1
    if result is not None:
        sys.stderr.write(f"mmssl: fine-tuned {result.step} steps; checkpoint {result.checkpoint}\n")
    return 0
