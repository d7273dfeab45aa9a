"""`mmssl wise --zeroshot CKPT --finetuned CKPT --alpha A --out FILE.pt`: one WiSE-FT checkpoint."""
from __future__ import annotations

import sys

from mmssl.finetune.cli import alpha_value


def register(subparsers) -> None:
    wise = subparsers.add_parser("wise", help="WiSE-FT: interpolate a zero-shot and a fine-tuned checkpoint")
    wise.add_argument("--zeroshot", required=True, help="the checkpoint that was fine-tuned (or openclip:NAME:WEIGHTS)")
    wise.add_argument("--finetuned", required=True, help="the checkpoint mmssl finetune wrote")
    wise.add_argument("--alpha", required=True, type=alpha_value, help="0: zero-shot, 1: fine-tuned")
    wise.add_argument("--out", required=True, help="the interpolated checkpoint (.pt)")
    wise.set_defaults(func=run)


def run(args) -> int:
    from mmssl.finetune.wise import write_wise

    path = write_wise(args.zeroshot, args.finetuned, args.alpha, args.out)
    sys.stderr.write(f"mmssl: wrote {path} (alpha {args.alpha})\n")
    return 0
