"""`mmssl embed`: shards -> image (and caption) embeddings in clip-retrieval's inference layout.

The driver cuts the data into parts (one per shard, or per `--shards-per-part` shards, in manifest
order), skips the parts already complete in OUT, runs the rest in this process (`--engine local`)
or on Ray actors (`--engine ray`), and writes `OUT/embed_info.json` last. Layout and the per-part
contract: `eval.embed_parts`; reading a folder back: `eval.embedding_parts`.
"""
from __future__ import annotations

import argparse

from mmssl.engines import add_engine_options

HELP = "embed shards with a model into img_emb/ text_emb/ metadata/ parts (clip-retrieval layout)"


def register(subparsers) -> None:
    parser = subparsers.add_parser("embed", help=HELP, description=HELP + "; complete parts are kept on rerun.")
    parser.add_argument("--checkpoint", required=True, help="mmssl checkpoint, run folder, or openclip:NAME[:WEIGHTS]")
    parser.add_argument("--data", required=True, help="shards: a folder with manifest.json or a brace pattern")
    parser.add_argument("--out", required=True, help="embeddings folder to write (resumed when it holds parts)")
    parser.add_argument("--modality", default="image", choices=("image", "image,text"),
                        help="image: image embeddings; image,text: also each sample's first caption")
    add_engine_options(parser)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="auto: bf16 where the hardware has native bf16, else fp32")
    parser.add_argument("--shards-per-part", type=int, default=1, help="consecutive shards per output part")
    parser.add_argument("--workers", type=int, default=1, help="data loader processes per part (0: in-process)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads while encoding (each Ray actor reserves as many CPUs); the same "
                             "value on both engines gives the same bits")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace embeddings OUT holds from another model, precision or modality")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from eval import embed_parts
    from mmssl.errors import require
    from mmssl.models.refs import checkpoint_ref

    require(args.batch_size > 0, f"--batch-size must be > 0, got {args.batch_size}")
    require(args.workers >= 0, f"--workers must be >= 0, got {args.workers}")
    require(args.threads >= 1, f"--threads must be >= 1, got {args.threads}")
    start = time.perf_counter()
    settings = embed_parts.Settings(
        model=checkpoint_ref(args.checkpoint).canonical, modalities=tuple(args.modality.split(",")),
        precision=args.precision, batch_size=args.batch_size, threads=args.threads, workers=args.workers)
    parts = embed_parts.plan_parts(args.data, args.shards_per_part)
    out = Path(args.out)
    require(not out.exists() or out.is_dir(), f"--out {out} exists and is not a folder")
    embed_parts.check_same_job(out, parts, settings, args.overwrite)
    embed_parts.remove_stale(out, parts, settings)
    records = {}
    for part in parts:
        record = embed_parts.complete_record(out, part, settings)
        if record is not None:
            records[part.name] = record
    todo = [part for part in parts if part.name not in records]
    if todo and args.engine == "ray":
        from eval.embed_ray import run_parts
        from mmssl.engines import ray_session

        with ray_session(args.ray_address) as ray:
            made = run_parts(ray, todo, str(out.resolve()), settings)
    elif todo:
        from eval.embed import load_model

        loaded = load_model(settings.model, settings.precision)
        made = [embed_parts.embed_part(loaded, part, out, settings) for part in todo]
    else:
        made = []
    records.update({record["part"]: record for record in made})
    embed_parts.remove_stale(out, parts, settings)      # temporary files a killed worker left
    info = embed_parts.write_info(out, parts, records, settings, time.perf_counter() - start)
    print(f"embedded {info['rows']} samples ({info['dim']}-d, {info['precision']}, {'+'.join(settings.modalities)}) "
          f"in {len(parts)} parts ({len(made)} made, {len(parts) - len(made)} kept) -> {out / embed_parts.INFO_FILE}")
    return 0
