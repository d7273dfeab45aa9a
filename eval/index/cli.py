"""`mmssl index build`, `mmssl index search` and `mmssl index add`."""
from __future__ import annotations

import argparse
from pathlib import Path

MAX_K = 1000


def register(subparsers) -> None:
    parser = subparsers.add_parser("index", help="build and query FAISS search indexes")
    commands = parser.add_subparsers(dest="index_command", metavar="{build,search,add}",
                                     parser_class=type(parser))
    commands.required = True

    build = commands.add_parser(
        "build", help="embed shards with a model (or take an embeddings .npy) and build a tuned index",
        description="Index type chosen from size and --memory-budget (Flat, HNSW over 8-bit codes, IVF-Flat, "
                    "OPQ+IVF+PQ); "
                    "efSearch/nprobe tuned to --recall-target; the choice and measured recall go to "
                    "OUT/index_info.json.")
    build.add_argument("--checkpoint", help="mmssl checkpoint, run folder, or openclip:NAME[:WEIGHTS]; "
                       "embeds --data and later the queries")
    build.add_argument("--data", help="shards to index: a folder with manifest.json or a brace pattern")
    build.add_argument("--embeddings", help="precomputed embeddings (.npy, one row per item, or a folder made by "
                       "`mmssl embed`) instead of --data")
    build.add_argument("--metadata", help="parquet with one row per embedding (key, caption, url, image_path, ...)")
    build.add_argument("--image-root", action="append", metavar="DIR",
                       help="with --embeddings: a folder the metadata's image_path files may be served from "
                            "(repeatable; default: the metadata parquet's folder)")
    build.add_argument("--modality", default="image", choices=("image", "image,text"),
                       help="image: index the images; image,text: also index the captions (text_index.faiss, "
                            "same ids), for caption search (clip-retrieval's modality=text)")
    build.add_argument("--text-embeddings", help="with --embeddings and --modality image,text: the caption "
                       "embeddings (.npy, row i describes the same item as row i of --embeddings)")
    build.add_argument("--out", required=True, help="index folder to write")
    build.add_argument("--memory-budget", default="4G", help="most memory the index may use (default 4G)")
    build.add_argument("--recall-target", type=float, default=0.95, help="recall@10 to tune for (default 0.95)")
    build.add_argument("--batch-size", type=int, default=256)
    build.add_argument("--workers", type=int, default=2, help="data loader processes for --data")
    build.add_argument("--allow-remote", action="store_true",
                       help="read http(s)/s3/gs shards named by --data (through fsspec; never pipe:)")
    _add_scale_options(build)
    build.set_defaults(func=run_build)

    search = commands.add_parser("search", help="print the top-k items for a text or image query")
    search.add_argument("--index", required=True, help="index folder made by `mmssl index build`")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="text query")
    query.add_argument("--image", help="image file query")
    search.add_argument("-k", type=int, default=10, help=f"results to print (1..{MAX_K}, default 10)")
    search.add_argument("--modality", choices=("image", "text"), default="image",
                        help="search the images (default) or the captions (an index built with --modality image,text)")
    search.add_argument("--output", type=Path, help="also write the hits as JSON here (with each hit's metadata row)")
    search.add_argument("--rerank", choices=("itm",), help="reorder the top --rerank-k by the index model's "
                                                         "image-text matching head (text over images, image over captions)")
    search.add_argument("--rerank-k", type=int, default=16, help="candidates the re-ranker reorders (default 16)")
    search.set_defaults(func=run_search)
    _register_add(commands)


def _register_add(commands) -> None:
    add = commands.add_parser(
        "add", help="add new items to an existing index folder (no retraining, the tuned knob kept)",
        description="Embed --data with the folder's model (or take an embeddings .npy) and append the items: ids "
                    "continue after the current count, metadata rows are appended, the folder is swapped in "
                    "atomically. A running `mmssl serve` picks it up on SIGHUP or POST /reload.")
    add.add_argument("--index", required=True, help="index folder made by `mmssl index build`")
    add.add_argument("--checkpoint", help="with --data: the model the index was built with (it must match)")
    add.add_argument("--data", help="shards of the new items: a folder with manifest.json or a brace pattern")
    add.add_argument("--embeddings", help="embeddings of the new items instead of --data: a .npy (one row per item) "
                     "or a folder made by `mmssl embed`")
    add.add_argument("--metadata", help="parquet with one row per new embedding (the index's columns)")
    add.add_argument("--text-embeddings", help="with --embeddings, for a folder built with --modality image,text: "
                     "the new items' caption embeddings (.npy, row i = item i)")
    add.add_argument("--image-root", action="append", metavar="DIR",
                     help="with --embeddings: a folder the new rows' image_path files may be served from "
                          "(repeatable; default: the metadata parquet's folder)")
    add.add_argument("--batch-size", type=int, default=256)
    add.add_argument("--workers", type=int, default=2, help="data loader processes for --data")
    add.add_argument("--allow-remote", action="store_true",
                     help="read http(s)/s3/gs shards named by --data (through fsspec; never pipe:)")
    add.set_defaults(func=run_add)


def run_add(args: argparse.Namespace) -> int:
    from eval.index.add import add_to_index, addable_info, check_model
    from eval.index.collection import from_embeddings, from_shards
    from mmssl.errors import require
    from mmssl.models.refs import checkpoint_ref

    require((args.data is None) != (args.embeddings is None), "give exactly one of --data or --embeddings")
    require(args.data is None or args.checkpoint is not None, "--data needs --checkpoint (the index's model)")
    require(args.checkpoint is None or args.data is not None,
            "--checkpoint goes with --data (embeddings are added to the index's own model)")
    for flag, value in (("--metadata", args.metadata), ("--text-embeddings", args.text_embeddings),
                        ("--image-root", args.image_root)):
        require(value is None or args.embeddings is not None, f"{flag} goes with --embeddings")
    require(args.batch_size > 0 and args.workers >= 0, "--batch-size must be > 0 and --workers >= 0")
    info = addable_info(args.index)
    with_text = "text" in info.get("modalities", ["image"])
    if args.data is not None:
        from eval.index.query import load_query_model

        model = checkpoint_ref(args.checkpoint).canonical
        check_model(info, model, args.index)      # before minutes of embedding
        collection = from_shards(load_query_model(model), args.data, args.batch_size, args.workers,
                                 allow_remote=args.allow_remote, text=with_text)
    elif Path(args.embeddings).is_dir():    # made by `mmssl embed`: vectors, captions' and metadata together
        from eval.index.collection import from_embedding_folder

        require(args.metadata is None and args.text_embeddings is None,
                "--embeddings DIR (an `mmssl embed` folder) carries its metadata and caption embeddings: "
                "drop --metadata / --text-embeddings")
        collection = from_embedding_folder(args.embeddings, args.image_root, text=with_text)
        if collection.source.get("model") and info.get("model"):
            check_model(info, collection.source["model"], args.index)
    else:
        require(not with_text or args.text_embeddings is not None,
                f"--index {args.index} also indexes captions: give --text-embeddings (the new items' caption vectors)")
        collection = from_embeddings(args.embeddings, args.metadata, args.image_root, args.text_embeddings)
    written = add_to_index(args.index, collection.vectors, collection.metadata, collection.source,
                           text_vectors=collection.text_vectors, image_roots=collection.image_roots,
                           number_keys=args.embeddings is not None and args.metadata is None
                           and not Path(args.embeddings).is_dir())
    added = written["additions"][-1]
    knob = f" (search knob {written['search']['param']}={written['search']['value']} kept, tuned at " \
           f"{written['additions'][0]['count_before']} items)" if written["search"].get("param") else ""
    print(f"added {added['added']} items to {args.index}: {added['count_before']} -> {written['count']}"
          f"{' images and captions' if with_text else ''}{knob}; version {written['keys_sha256'][:12]}")
    return 0


def _add_scale_options(build) -> None:
    """--engine/--ray-address (where the rows are added), --on-disk, --index-type."""
    from eval.index.choose import KINDS
    from mmssl.engines import add_engine_options

    add_engine_options(build)
    build.add_argument("--on-disk", action="store_true",
                       help="IVF indexes: keep the inverted lists in OUT/index.ivfdata, memory-mapped when "
                            "searching, instead of in memory")
    build.add_argument("--index-type", default="auto", choices=("auto",) + KINDS,
                       help="auto: chosen from size and --memory-budget (default); otherwise this type")


def _scale_plan(args, vectors):
    """The index plan of --index-type, checked against --on-disk before the index is built."""
    from eval.index.choose import IVF_KINDS, parse_memory, plan_for_kind
    from mmssl.errors import UserError

    n, d = vectors.shape
    plan = plan_for_kind(args.index_type, n, d, parse_memory(args.memory_budget))
    if args.on_disk and plan.kind not in IVF_KINDS and args.index_type != "auto":
        raise UserError(f"--on-disk needs an IVF index (--index-type ivf_flat or opq_ivf_pq), not {plan.kind}")
    if args.on_disk and plan.kind not in IVF_KINDS:
        raise UserError(f"--on-disk needs an IVF index, but {n} vectors of dim {d} get a {plan.kind} index under "
                        f"--memory-budget {args.memory_budget}: pass --index-type ivf_flat (or opq_ivf_pq), "
                        "or a lower --memory-budget")
    return plan


def run_build(args: argparse.Namespace) -> int:
    from eval.index.build import build_index
    from eval.index.choose import parse_memory
    from eval.index.collection import from_embeddings, from_shards
    import shutil

    from eval.index.store import lists_file_for, save_index_folder
    from mmssl.errors import require
    from mmssl.models.refs import checkpoint_ref

    require((args.data is None) != (args.embeddings is None), "give exactly one of --data or --embeddings")
    require(args.data is None or args.checkpoint is not None, "--data needs --checkpoint to embed the images")
    require(args.metadata is None or args.embeddings is not None, "--metadata goes with --embeddings")
    require(args.image_root is None or args.embeddings is not None, "--image-root goes with --embeddings")
    with_text = args.modality == "image,text"
    require(args.text_embeddings is None or (args.embeddings is not None and with_text),
            "--text-embeddings goes with --embeddings and --modality image,text")
    embedding_folder = args.embeddings is not None and Path(args.embeddings).is_dir()   # made by `mmssl embed`
    require(not embedding_folder or (args.metadata is None and args.text_embeddings is None),
            "--embeddings DIR (an `mmssl embed` folder) holds its own metadata and caption embeddings")
    require(not with_text or args.data is not None or args.text_embeddings is not None or embedding_folder,
            "--modality image,text with --embeddings needs --text-embeddings (the caption vectors)")
    require(0.0 < args.recall_target <= 1.0, f"--recall-target must be in (0, 1], got {args.recall_target}")
    require(args.batch_size > 0 and args.workers >= 0, "--batch-size must be > 0 and --workers >= 0")
    parse_memory(args.memory_budget)
    model = checkpoint_ref(args.checkpoint).canonical if args.checkpoint else None  # what index_info.json records

    if args.data is not None:
        from eval.index.query import load_query_model

        collection = from_shards(load_query_model(model), args.data, args.batch_size, args.workers,
                                 allow_remote=args.allow_remote, text=with_text)
    elif embedding_folder:
        from eval.index.collection import from_embedding_folder

        collection = from_embedding_folder(args.embeddings, args.image_root, text=with_text)
        if model is not None:
            _check_model_dim(model, collection.vectors.shape[1])
    else:
        collection = from_embeddings(args.embeddings, args.metadata, args.image_root, args.text_embeddings)
        if model is not None:
            _check_model_dim(model, collection.vectors.shape[1])
    from eval.index.ray_build import rows_adder

    plan = _scale_plan(args, collection.vectors)
    lists_file = lists_file_for(args.out) if args.on_disk else None   # the lists grow on disk
    try:
        with rows_adder(args.engine, args.ray_address) as add_rows:
            built = build_index(collection.vectors, args.memory_budget, args.recall_target,
                                queries=collection.queries, query_source=collection.query_source,
                                plan=plan, add_rows=add_rows, lists_file=lists_file)
        metadata = collection.metadata if built.order is None else collection.metadata.take(built.order)
        extra, text_index = {}, None
        if with_text:
            text_built = build_caption_index(collection, built.order, args.memory_budget, args.recall_target)
            text_index, extra["text_index"] = text_built.index, text_built.info
        info = save_index_folder(args.out, built.index, {**built.info, **extra, "source": collection.source,
                                                         "image_roots": collection.image_roots}, metadata, model,
                                 text_index=text_index, on_disk=args.on_disk)
    except BaseException:
        if lists_file is not None:
            shutil.rmtree(lists_file.parent, ignore_errors=True)
        raise
    tuning, held_out, built = info["tuning"], info["held_out"], info["index"]
    knob = f", {info['search']['param']}={info['search']['value']}" if info["search"]["param"] else ""
    checked = f", {held_out['recall']:.3f} held out" if held_out["recall"] is not None else ""
    print(f"indexed {info['count']} vectors ({info['dim']}-d) as {built['factory']}{knob}: "
          f"recall@{tuning['k']} {tuning['recall']:.3f} tuning{checked} (target {tuning['recall_target']}"
          f"{'' if tuning['target_reached'] else ', NOT reached'}), "
          f"~{built['memory_estimate_bytes'] / 2**20:.1f} MiB, built in {info['timings_s']['total']:.1f} s "
          f"-> {Path(args.out) / 'index_info.json'}")
    if with_text:
        text = info["text_index"]
        knob = f", {text['search']['param']}={text['search']['value']}" if text["search"]["param"] else ""
        recall = text["held_out"]["recall"]
        print(f"indexed {info['count']} captions as {text['index']['factory']}{knob}: recall@{text['tuning']['k']} "
              f"{text['tuning']['recall']:.3f} tuning" + (f", {recall:.3f} held out" if recall is not None else ""))
    return 0


def build_caption_index(collection, order, memory_budget, recall_target):
    """The caption index, its rows in the image index's id order, tuned on image embeddings
    (image->caption search), which are never among the indexed caption vectors."""
    from eval.index.build import build_index

    text_vectors = collection.text_vectors if order is None else collection.text_vectors[order]
    built = build_index(text_vectors, memory_budget, recall_target, queries=collection.vectors,
                        query_source="image embeddings (image->caption)")
    assert built.order is None   # given queries: no rows held out, ids are the row order
    return built


def _check_model_dim(model: str, dim: int) -> None:
    from eval.index.query import QueryEncoder
    from mmssl.errors import UserError

    model_dim = QueryEncoder.from_checkpoint(model).encode_texts([""]).shape[1]
    if model_dim != dim:
        raise UserError(f"--checkpoint embeds into {model_dim} dimensions but --embeddings are {dim}-d")


def run_search(args: argparse.Namespace) -> int:
    from mmssl.data.image_guard import ImageRefused
    from eval.index.query import check_text_query
    from eval.index.search import Searcher
    from mmssl.errors import UserError, require

    require(1 <= args.k <= MAX_K, f"-k must be in 1..{MAX_K}, got {args.k}")
    require(args.text is None or args.text.strip() != "", "--text is empty")
    if args.text is not None:
        check_text_query(args.text)
    path = Path(args.image) if args.image is not None else None
    if path is not None and not path.is_file():
        raise UserError(f"image not found: {path}")
    from eval.index.rerank import MAX_RERANK_K, SearchReranker, rerankable

    kind = "text" if args.text is not None else "image"
    if args.rerank:
        require(1 <= args.rerank_k <= MAX_RERANK_K, f"--rerank-k must be in 1..{MAX_RERANK_K}, got {args.rerank_k}")
        require(rerankable(kind, args.modality), f"--rerank needs a text query over images or an image query over "
                                                 f"captions (--modality text), not a {kind} query over {args.modality}s")
    searcher = Searcher.open(args.index)
    searcher.folder.index_for(args.modality)          # a folder without captions: one line, exit 2
    reranker = SearchReranker.for_searcher(searcher, args.rerank) if args.rerank else None
    candidates = max(args.k, args.rerank_k) if reranker else args.k
    if kind == "text":
        query = args.text
        hits = searcher.search_texts([query], candidates, args.modality)
    else:
        try:
            query = searcher.require_encoder().prepare_image(path.read_bytes())
        except ImageRefused as err:
            raise UserError(f"{path}: {err}") from None
        hits = searcher.search_images([query], candidates, args.modality)
    if reranker:
        hits = reranker.rerank(kind, [query], hits, args.modality)
    hits = hits[0][:args.k]
    width = max([len("key")] + [len(hit.key) for hit in hits])
    match = f"  {'match':>7}" if reranker else ""
    print(f"{'rank':>4}  {'score':>7}{match}  {'key':<{width}}  caption")
    for hit in hits:
        value = "" if not reranker else "        -" if hit.match is None else f"  {hit.match:>7.3f}"
        print(f"{hit.rank:>4}  {hit.score:>7.4f}{value}  {hit.key:<{width}}  {hit.caption}")
    if args.output:
        _write_hits(args.output, args, hits, searcher.folder.metadata)
    return 0


def _write_hits(path: Path, args: argparse.Namespace, hits: list, metadata) -> None:
    """The query and its hits; each hit carries its full metadata row (where the image is stored, ...)."""
    import json
    from dataclasses import asdict

    record = {
        "index": args.index,
        "query": args.text if args.text is not None else args.image,
        "query_type": "text" if args.text is not None else "image",
        "modality": args.modality,
        "k": args.k,
        "rerank": {"scorer": args.rerank, "k": args.rerank_k} if args.rerank else None,
        "results": [{**metadata.row(hit.id), **asdict(hit)} for hit in hits],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
