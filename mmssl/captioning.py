"""`mmssl caption`: captions for images from a checkpoint trained with `loss.caption_weight > 0`.

    mmssl caption --checkpoint CKPT (--image FILE [FILE ...] | --data DIR) [--beams N] [--max-tokens T]
                  [--batch-size B] [--output FILE.jsonl]

One JSON line per image, {"image": FILE, "caption": ...} or, for shards, {"key": KEY, "caption": ...},
on stdout or into --output. The decoder is the checkpoint's caption head (`mmssl.heads.caption`):
greedy with --beams 1, beam search otherwise; for an open_clip CoCa model its own text decoder
(`mmssl.heads.coca`: greedy is exactly open_clip's `generate(generation_type="top_k", top_k=1,
seq_len=max_tokens + 1, min_seq_len=1)` with SOT dropped and cut at EOT / padding). Files given with --image are untrusted: they are
admitted by `mmssl.data.image_guard` (format, sides and pixel count checked from the header, so a
decompression bomb is refused before decoding).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable, Iterator

from mmssl.arg_types import non_negative_int, positive_int


def register(subparsers) -> None:
    parser = subparsers.add_parser("caption", help="caption images with a checkpoint's caption head (CoCa)",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="mmssl checkpoint (.pt or run folder) trained with "
                                                            "loss.caption_weight > 0")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", nargs="+", type=Path, metavar="FILE", help="image files (JPEG, PNG, WebP, GIF)")
    source.add_argument("--data", help="shards (folder with manifest.json, or a brace pattern)")
    add_decoding_options(parser)
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images decoded together (default 32)")
    parser.add_argument("--workers", type=non_negative_int, default=2, help="data loader processes for --data")
    parser.add_argument("--output", type=Path, help="write the JSON lines here instead of stdout")
    parser.set_defaults(func=handle)


def add_decoding_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--beams", type=positive_int, default=1, help="1: greedy (default); N: beam search")
    parser.add_argument("--max-tokens", type=positive_int, default=20,
                        help="most tokens per caption, end token included (default 20; at most the context length - 1)")


def handle(args: argparse.Namespace) -> int:
    import torch

    import mmssl
    from mmssl.heads.saved import load_head
    from mmssl.models import image_transform
    from mmssl.models.refs import checkpoint_ref
    from mmssl.train.policy import default_device

    model = mmssl.create_model(checkpoint_ref(args.checkpoint)).eval()
    model.to(default_device())
    head = load_head(args.checkpoint, "caption", model)
    transform = image_transform(model, train=False)
    if args.image:
        batches = _image_batches(args.image, transform, args.batch_size, model)
        total = len(args.image)
    else:
        from mmssl.data import build_eval_loader
        from mmssl.errors import UserError

        if "{" not in args.data and not Path(args.data).exists():
            raise UserError(f"data not found: {args.data}")
        loader = build_eval_loader(args.data, transform=transform, batch_size=args.batch_size,
                                   num_workers=args.workers)
        batches = ((batch.images, batch.keys) for batch in loader)
        total = loader.num_samples
    field = "image" if args.image else "key"
    out = args.output.open("w") if args.output else sys.stdout
    try:
        with torch.inference_mode():
            for key, caption in caption_batches(model, head, batches, args.beams, args.max_tokens,
                                                total=total, progress=not args.image):
                out.write(json.dumps({field: key, "caption": caption}) + "\n")
                out.flush()
    finally:
        if args.output:
            out.close()
    return 0


def caption_batches(model, head, batches: Iterable, beams: int = 1, max_tokens: int = 20, total=None,
                    progress: bool = True, precision=None) -> Iterator[tuple]:
    """(key, caption text) for each image of `batches`, an iterable of (images [B, 3, H, W], keys);
    a tqdm bar when `progress`; `precision`: a context manager factory for autocast (None: fp32)."""
    from contextlib import nullcontext

    from tqdm import tqdm

    from mmssl.heads.caption import decode_caption, generate

    device = next(model.parameters()).device
    bar = tqdm(total=total, desc="captioning", unit="img", leave=False, dynamic_ncols=True, disable=not progress)
    try:
        for images, keys in batches:
            with (precision or nullcontext)():
                ids = generate(model, head, images.to(device), max_tokens=max_tokens, beams=beams)
            for key, caption in zip(keys, ids):
                yield key, decode_caption(model.tokenizer, caption)
            bar.update(len(keys))
    finally:
        bar.close()


def _image_batches(paths: list, transform, batch_size: int, model) -> Iterator[tuple]:
    """(images, file names) of the --image files, each admitted by the image guard first."""
    import torch

    from mmssl.data.image_guard import QUERY_LIMITS, ImageRefused, admit_image
    from mmssl.errors import UserError

    side = _input_side(model)
    for path in paths:     # every file is checked before any caption is written
        if not path.is_file():
            raise UserError(f"image not found: {path}")
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        tensors = []
        for path in chunk:
            try:
                tensors.append(transform(admit_image(path.read_bytes(), QUERY_LIMITS, side)))
            except ImageRefused as err:
                raise UserError(f"{path}: {err}") from None
        yield torch.stack(tensors), [str(path) for path in chunk]


def _input_side(model) -> int | None:
    size = getattr(model.visual, "image_size", None)
    if isinstance(size, int):
        return size
    if isinstance(size, (tuple, list)) and size:
        return max(int(side) for side in size)
    return None




