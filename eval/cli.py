"""`mmssl eval zeroshot | classify | retrieval | linear-probe | knn | caption-selection | captioning | suite`: CLIP_benchmark-style
JSON on stdout (and --output); `suite` runs a datasets file for several models (eval/suite.py).

Only argparse and pathlib at import time: torch, open_clip and FAISS load inside the handlers.
NaN metrics (acc5 with fewer than 5 classes) are written as JSON null so any JSON reader accepts them.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from mmssl.arg_types import non_negative_int, positive_int
from mmssl.config import PRECISIONS


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="zero-shot classification, retrieval, linear probe")
    tasks = parser.add_subparsers(dest="eval_task", metavar="TASK", parser_class=type(parser))
    tasks.required = True

    zeroshot = tasks.add_parser("zeroshot", help="zero-shot classification of a labelled set")
    _add_model_options(zeroshot)
    zeroshot.add_argument("--data", required=True, help="labelled shards (folder/pattern), a CLIP_benchmark "
                                                        "webdataset folder, or a class-folder tree")
    _add_split_option(zeroshot)
    zeroshot.add_argument("--classnames", help="FILE, or imagenet|cifar10|cifar100 (default: DATA/classnames.txt, "
                                               "else the class folder names)")
    zeroshot.add_argument("--templates", help="FILE (one template per line with {} or {c}), or openai|simple "
                                              "(default: DATA/templates.txt, or a CLIP_benchmark folder's "
                                              "zeroshot_classification_templates.txt; else openai)")
    zeroshot.add_argument("--per-class", type=Path, help="write a per-class recall table (CSV)")
    zeroshot.add_argument("--confusion", type=Path, help="write a confusion-matrix image (PNG)")
    zeroshot.set_defaults(func=run_zeroshot_command)

    classify = tasks.add_parser("classify", help="classify a labelled set with a fine-tuned checkpoint's class head")
    _add_model_options(classify)
    classify.add_argument("--data", required=True, help="labelled shards (folder/pattern), a CLIP_benchmark "
                                                        "webdataset folder, or a class-folder tree")
    _add_split_option(classify)
    classify.add_argument("--per-class", type=Path, help="write a per-class recall table (CSV)")
    classify.set_defaults(func=run_classify_command)

    retrieval = tasks.add_parser("retrieval", help="image<->text retrieval on a captioned set")
    _add_model_options(retrieval)
    retrieval.add_argument("--data", required=True, help="captioned shards (json 'captions' list, else .txt), "
                                                         "or a CLIP_benchmark webdataset folder")
    _add_split_option(retrieval)
    retrieval.add_argument("--rerank", choices=("itm",), help="reorder each query's cosine top --rerank-k by the "
                                                            "checkpoint's image-text matching head")
    retrieval.add_argument("--rerank-k", type=_rerank_k, default=16, help="candidates re-ranked per query "
                                                                         "(default 16, at most 256)")
    retrieval.set_defaults(func=run_retrieval_command)

    probe = tasks.add_parser("linear-probe", help="logistic regression on frozen image features")
    _add_model_options(probe)
    probe.add_argument("--train", required=True, help="labelled training set (a CLIP_benchmark folder: its train split)")
    probe.add_argument("--test", required=True, help="labelled test set (a CLIP_benchmark folder: its test split)")
    probe.add_argument("--seed", type=int, default=0, help="seed of the validation split (with --fewshot-k: "
                                                           "the first draw seed)")
    probe.add_argument("--fewshot-k", type=_fewshot_ks, metavar="K,K,...",
                       help="few-shot curve: K labelled training images per class for each K (e.g. 1,2,4,8,16; "
                            "each at most 1024, at most 16 values), probed on the full test set; zero-shot as k=0")
    probe.add_argument("--seeds", type=_fewshot_seeds, help="with --fewshot-k: draws per K, seeds --seed, --seed+1, ... "
                                                           "(default 3, at most 100); mean and std over them")
    probe.add_argument("--plot", type=Path, help="with --fewshot-k: write accuracy against K (PNG)")
    probe.set_defaults(func=run_linear_probe_command)

    knn = tasks.add_parser("knn", help="k-NN classifier on frozen image features (cosine, weighted vote)")
    _add_model_options(knn)
    knn.add_argument("--train", required=True, help="labelled set the neighbours come from (a CLIP_benchmark "
                                                    "folder: its train split)")
    knn.add_argument("--test", required=True, help="labelled test set (a CLIP_benchmark folder: its test split)")
    knn.add_argument("--k", type=positive_int, default=20, help="neighbours per test image (default 20)")
    knn.set_defaults(func=run_knn_command)

    selection = tasks.add_parser("caption-selection", help="does each image's true caption outscore its hard "
                                                           "negatives (json 'captions': true first)?")
    _add_model_options(selection)
    selection.add_argument("--data", required=True, help="shards whose json holds 'captions' (true caption first, "
                                                         "then negatives) and optionally 'negative_kinds', e.g. "
                                                         "the binding/ split of `mmssl prep synthetic`")
    _add_split_option(selection)
    selection.add_argument("--scorer", choices=("cosine", "itm", "caption"), default="cosine",
                           help="cosine: dual-encoder image.text similarity; itm: the checkpoint's "
                                "image-text matching head; caption: its caption decoder's log-likelihood")
    selection.set_defaults(func=run_caption_selection_command)

    captioning = tasks.add_parser("captioning", help="caption each image with the checkpoint's caption head; "
                                                     "BLEU-4 and CIDEr against all its reference captions")
    _add_model_options(captioning)
    captioning.add_argument("--data", required=True, help="captioned shards (json 'captions' list, else .txt)")
    _add_split_option(captioning)
    from mmssl.captioning import add_decoding_options

    add_decoding_options(captioning)
    captioning.set_defaults(func=run_captioning_command, batch_size=64)

    suite = tasks.add_parser("suite", help="several models on the evaluations a datasets file lists, "
                                           "each model loaded once; one JSON per pair, one table")
    suite.add_argument("--checkpoint", required=True, nargs="+", metavar="CKPT",
                       help="mmssl checkpoints (.pt or run folders) and/or openclip:NAME[:WEIGHTS]")
    suite.add_argument("--datasets", required=True, type=Path,
                       help="one evaluation a line: 'zeroshot DATA', 'retrieval DATA', 'linear-probe TRAIN TEST', "
                            "then options (name=, split=, classnames=, templates=, seed=); # comments; "
                            "paths relative to the file's folder")
    suite.add_argument("--out", type=Path, default=Path("eval_suite"),
                       help="one JSON per (model, evaluation) and results.csv / results.md (default: eval_suite); "
                            "a rerun skips the pairs already there")
    _add_run_options(suite)
    suite.set_defaults(func=run_suite_command)


def _add_split_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", default=None,
                        help="the split folder of a CLIP_benchmark webdataset folder to read (default: test)")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="mmssl checkpoint (.pt or run folder), or openclip:NAME[:WEIGHTS]")
    parser.add_argument("--output", type=Path, help="also write the result JSON here")
    _add_run_options(parser)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=positive_int, default=256)
    parser.add_argument("--workers", type=non_negative_int, default=2, help="data loader processes")
    parser.add_argument("--allow-remote", action="store_true",
                        help="read http(s)/s3/gs shards named by the data (through fsspec; never pipe:)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="auto: bf16 on CUDA or CPUs with native bf16, else fp32 (fp16: CUDA only)")


def run_zeroshot_command(args) -> int:
    from eval.embed import load_model
    from eval.zeroshot import run_zeroshot, write_confusion, write_per_class
    from mmssl.models.factory import require_text_tower

    from eval.classify import load_classifier

    loaded = load_model(args.checkpoint, args.precision)
    # a fine-tuned checkpoint classifies through its head's class vectors, unless other classes are asked for
    head = None if args.classnames or args.templates else load_classifier(args.checkpoint, required=False)
    if head is not None:
        outcome = _classify(loaded, head, args)
        outcome["result"].update(task="zeroshot_classification", classifier="finetuned head")
    else:
        require_text_tower(loaded.model, "mmssl eval zeroshot")
        outcome = run_zeroshot(loaded, args.data, args.classnames,
                               args.templates, args.batch_size, args.workers, allow_remote=args.allow_remote,
                               split=args.split)
    if args.per_class:
        write_per_class(args.per_class, outcome["logits"], outcome["labels"], outcome["classnames"])
    if args.confusion:
        write_confusion(args.confusion, outcome["logits"], outcome["labels"], outcome["classnames"])
    _emit(outcome["result"], args.output)


def run_classify_command(args) -> int:
    from eval.classify import load_classifier
    from eval.embed import load_model
    from eval.zeroshot import write_per_class

    head = load_classifier(args.checkpoint)
    outcome = _classify(load_model(args.checkpoint, args.precision), head, args)
    if args.per_class:
        write_per_class(args.per_class, outcome["logits"], outcome["labels"], outcome["classnames"])
    _emit(outcome["result"], args.output)


def _classify(loaded, head, args) -> dict:
    from eval.classify import run_classify

    outcome = run_classify(loaded, head, args.data, args.batch_size, args.workers,
                           allow_remote=args.allow_remote, split=args.split)
    return {**outcome, "classnames": head.classnames}


def run_retrieval_command(args) -> int:
    from eval.embed import load_model
    from eval.retrieval import run_retrieval
    from mmssl.models.factory import require_text_tower

    loaded = load_model(args.checkpoint, args.precision)
    require_text_tower(loaded.model, "mmssl eval retrieval")
    head = None
    if args.rerank:
        from mmssl.heads.saved import load_head

        head = load_head(args.checkpoint, args.rerank, loaded.model)
    outcome = run_retrieval(loaded, args.data, args.batch_size, args.workers,
                            allow_remote=args.allow_remote, split=args.split, rerank_head=head, rerank_k=args.rerank_k)
    _emit(outcome["result"], args.output)


def run_linear_probe_command(args) -> int:
    if args.fewshot_k is not None:
        return _run_fewshot_command(args)
    if args.seeds is not None or args.plot is not None:
        from mmssl.errors import UserError

        raise UserError("--seeds and --plot go with --fewshot-k")
    from eval.embed import load_model
    from eval.linear_probe import run_linear_probe

    result = run_linear_probe(load_model(args.checkpoint, args.precision), args.train, args.test,
                              args.batch_size, args.workers, args.seed, allow_remote=args.allow_remote)
    _emit(result, args.output)


def _run_fewshot_command(args) -> int:
    from eval.embed import load_model
    from eval.fewshot import DEFAULT_SEEDS, run_fewshot
    from mmssl.errors import UserError

    if args.seed < 0:
        raise UserError(f"--seed {args.seed}: few-shot draw seeds must be >= 0")
    seeds = range(args.seed, args.seed + (args.seeds or DEFAULT_SEEDS))
    result = run_fewshot(load_model(args.checkpoint, args.precision), args.train, args.test, args.fewshot_k, seeds,
                         args.batch_size, args.workers, allow_remote=args.allow_remote)["result"]
    if args.plot:
        from mmssl.report.plots import plot_fewshot

        points = [result["metrics"][str(k)] for k in result["fewshot_k"]]
        plot_fewshot(result["fewshot_k"], [p["lp_acc1_mean"] for p in points], [p["lp_acc1_std"] for p in points],
                     args.plot, result["metrics"].get("0", {}).get("acc1"),
                     title=f"Few-shot linear probe, {len(seeds)} seed{'s' if len(seeds) > 1 else ''}")
    _emit(result, args.output)


def run_knn_command(args) -> int:
    from eval.embed import load_model
    from eval.knn import run_knn

    result = run_knn(load_model(args.checkpoint, args.precision), args.train, args.test, args.k,
                     args.batch_size, args.workers, allow_remote=args.allow_remote)
    _emit(result, args.output)


def run_caption_selection_command(args) -> int:
    from eval.caption_selection import run_caption_selection
    from eval.embed import load_model

    outcome = run_caption_selection(load_model(args.checkpoint, args.precision), args.data, args.scorer,
                                    checkpoint=args.checkpoint, batch_size=args.batch_size, workers=args.workers,
                                    allow_remote=args.allow_remote, split=args.split)
    _emit(outcome["result"], args.output)


def run_captioning_command(args) -> int:
    from eval.captioning import run_captioning
    from eval.embed import load_model

    outcome = run_captioning(load_model(args.checkpoint, args.precision), args.data, checkpoint=args.checkpoint,
                             beams=args.beams, max_tokens=args.max_tokens, batch_size=args.batch_size,
                             workers=args.workers, allow_remote=args.allow_remote, split=args.split)
    _emit(outcome["result"], args.output)


def run_suite_command(args) -> int:
    from eval.suite import RESULTS_MD, run_suite

    run_suite(args.checkpoint, args.datasets, args.out, batch_size=args.batch_size, workers=args.workers,
              precision=args.precision, allow_remote=args.allow_remote)
    print((args.out / RESULTS_MD).read_text(), end="")


def result_text(result: dict) -> str:
    """A result as `mmssl eval` prints and writes it: indented JSON, NaN as null."""
    return json.dumps(_nan_to_null(result), indent=2)


def _emit(result: dict, output: Path | None) -> None:
    text = result_text(result)
    print(text)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text + "\n")


def _nan_to_null(value):
    if isinstance(value, dict):
        return {key: _nan_to_null(item) for key, item in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value




def _fewshot_ks(text: str) -> list:
    from eval.fewshot import MAX_K, MAX_KS

    values = [positive_int(part.strip()) for part in text.split(",")]
    if len(values) > MAX_KS:
        raise argparse.ArgumentTypeError(f"at most {MAX_KS} values, got {len(values)}")
    too_big = [value for value in values if value > MAX_K]
    if too_big:
        raise argparse.ArgumentTypeError(f"each K at most {MAX_K}, got {too_big[0]}")
    return sorted(set(values))


def _fewshot_seeds(text: str) -> int:
    from eval.fewshot import MAX_SEEDS

    value = positive_int(text)
    if value > MAX_SEEDS:
        raise argparse.ArgumentTypeError(f"at most {MAX_SEEDS}, got {value}")
    return value


def _rerank_k(text: str) -> int:
    from eval.rerank import MAX_K

    value = positive_int(text)
    if value > MAX_K:
        raise argparse.ArgumentTypeError(f"at most {MAX_K}, got {value}")
    return value


