"""Beyond the dual encoder (issue 13's benchmark): does ITM or captioning fix what cosine gets wrong?

Variants train the tiny config's model (tiny-vit-64, Muon as configs/tiny.yaml, fp32, seed 0) on
the same synthetic shards for the same wall-clock budget (steps = budget / calibrated seconds per
step): CLIP, CLIP + ITM (`loss.itm_weight=1`), CLIP + captioning (`loss.caption_weight=1`, CoCa),
SigLIP. Each is scored on what it has not seen:

* caption selection on `binding/` (two-object scenes against colour-, shape- and position-swapped
  captions): accuracy overall and per kind, with every scorer the variant has (cosine; the ITM
  head; the captioner's caption log-likelihood);
* retrieval R@1 / R@5 on `val` and on `binding/`, plain and re-ranked by the ITM head (top 16);
* BLEU-4 / CIDEr of the captioner's greedy captions on `val` against its reference captions;
* the cost of each head: training samples/s against plain CLIP in the same run.

Then `mmssl serve` on an index of `val` built with the ITM variant's checkpoint takes the 8-client
text-query load of bench/serve_load.py, once with `rerank_k` 0 and once with 16: p50 / p99 latency
and queries/s of both, same run.

usage: python bench/matching.py [--budget-s 600] [--variants clip,itm,caption,siglip] [--serve-seconds 30]
Prints one JSON object; partial results go to stderr as they come.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


aux_heads = _bench_module("aux_heads")            # world, overrides, calibration
ssl_objectives = _bench_module("ssl_objectives")  # `mmssl train` in a child process with its peak RSS
serve_load = _bench_module("serve_load")          # server start-up and the concurrent clients

# name -> (overrides on top of configs/tiny.yaml and the bench's base, the config key it needs)
VARIANTS = {
    "clip": ([], None),
    "itm": (["loss.itm_weight=1"], "itm_weight"),
    "caption": (["loss.caption_weight=1"], "caption_weight"),
    "siglip": (["loss.kind=siglip"], None),
}
ANCHOR = "clip"
RERANK_K = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=600.0, help="training seconds per variant")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--num-train", type=int, default=20000)
    parser.add_argument("--num-val", type=int, default=960)
    parser.add_argument("--num-binding", type=int, default=480)
    parser.add_argument("--serve-seconds", type=float, default=30.0, help="seconds of 8-client load per setting (0: skip)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--work", default=str(REPO / "bench" / "results" / "matching"))
    args = parser.parse_args()
    names = aux_heads.pick_variants(parser, args.variants, VARIANTS)
    import torch

    torch.set_num_threads(aux_heads.THREADS)
    work = Path(args.work)
    world = binding_world(work / "world", args.num_train, args.num_val, args.num_binding)
    result = {"model": "tiny-vit-64", "optimizer": "muon", "budget_s": args.budget_s, "threads": aux_heads.THREADS,
              "cpu_count": os.cpu_count(), "load_avg_1m_start": os.getloadavg()[0], "num_train": args.num_train,
              "num_binding": args.num_binding, "seed": 0, "variants": {}, "skipped": {}}
    for name in names:
        extra, needs = VARIANTS[name]
        if needs is not None and not _has_loss_key(needs):
            result["skipped"][name] = f"loss.{needs} is not built yet"
            continue
        overrides = aux_heads.base_overrides(world, work / name, 128) + ["train.optimizer=muon"] + extra
        seconds_per_step = aux_heads.calibrate(overrides, 6)
        steps = max(10, int(args.budget_s / seconds_per_step))
        run = ssl_objectives.train_subprocess(overrides, steps)
        run.update(calibrated_s_per_step=seconds_per_step)
        run.update(evaluate(Path(run["checkpoint"]), world, name))
        result["variants"][name] = run
        print(f"[matching] {name}: {json.dumps(run)}", file=sys.stderr, flush=True)
    anchor = result["variants"].get(ANCHOR)
    for run in result["variants"].values():
        if anchor:
            run["samples_per_s_over_clip"] = round(run["samples_per_s"] / anchor["samples_per_s"], 3)
    if args.serve_seconds > 0 and "itm" in result["variants"]:
        result["serve"] = serve_with_rerank(Path(result["variants"]["itm"]["checkpoint"]), world, work,
                                            args.serve_seconds, args.clients)
        print(f"[matching] serve: {json.dumps(result['serve'])}", file=sys.stderr, flush=True)
    result["load_avg_1m_end"] = os.getloadavg()[0]
    print(json.dumps(result, indent=1))


def _has_loss_key(name: str) -> bool:
    import dataclasses

    from mmssl.config import LossConfig

    return name in {f.name for f in dataclasses.fields(LossConfig)}


def binding_world(directory: Path, num_train: int, num_val: int, num_binding: int) -> Path:
    """The synthetic world with its binding/ split (generated once, reused by later runs)."""
    from data_prep.synthetic import generate

    splits = {"train": num_train, "val": num_val, "binding": num_binding}
    counts = {split: json.loads((directory / split / "manifest.json").read_text())["num_samples"]
              if (directory / split / "manifest.json").is_file() else None for split in splits}
    if counts != splits:
        generate(directory, num_train=num_train, num_val=num_val, num_binding=num_binding, image_size=64, seed=0,
                 workers=2, overwrite=True, quiet=True)
    return directory


def evaluate(checkpoint: Path, world: Path, name: str) -> dict:
    """Caption selection with each scorer the variant has, retrieval plain and re-ranked, captioning."""
    from eval.caption_selection import run_caption_selection
    from eval.embed import load_model
    from eval.retrieval import run_retrieval
    from eval.zeroshot import run_zeroshot
    from mmssl.heads.saved import load_head

    loaded = load_model(str(checkpoint), precision="fp32")
    out = {"zeroshot_top1_val": run_zeroshot(loaded, str(world / "val"), workers=1)["result"]["metrics"]["acc1"]}
    scorers = ["cosine"] + {"itm": ["itm"], "caption": ["caption"]}.get(name, [])
    for scorer in scorers:
        metrics = run_caption_selection(loaded, str(world / "binding"), scorer, checkpoint=str(checkpoint),
                                        workers=1)["result"]["metrics"]
        out[f"selection_{scorer}"] = {key: value for key, value in metrics.items() if key.startswith("acc")}
    head = load_head(str(checkpoint), "itm", loaded.model) if name == "itm" else None
    for split in ("val", "binding"):
        plain = run_retrieval(loaded, str(world / split), workers=1)["result"]["metrics"]
        out[f"retrieval_{split}"] = _recalls(plain)
        if head is not None:
            reranked = run_retrieval(loaded, str(world / split), workers=1, rerank_head=head, rerank_k=RERANK_K)
            out[f"retrieval_{split}_rerank{RERANK_K}"] = _recalls(reranked["result"]["metrics"])
            out[f"rerank_seconds_{split}"] = reranked["result"]["rerank"]["seconds"]
    if name == "caption":
        from eval.captioning import run_captioning

        metrics = run_captioning(loaded, str(world / "val"), checkpoint=str(checkpoint), workers=1)["result"]["metrics"]
        out["captioning_val"] = {key: metrics[key] for key in ("bleu4", "cider") if key in metrics}
    return out


def _recalls(metrics: dict) -> dict:
    return {f"{direction}_r{k}": round(metrics[f"{direction}_retrieval_recall@{k}"], 4)
            for direction in ("image", "text") for k in (1, 5)}


def serve_with_rerank(checkpoint: Path, world: Path, work: Path, seconds: float, clients: int) -> dict:
    """p50 / p99 / q/s of 8 concurrent text-query clients with rerank_k 0 and 16, one server."""
    from mmssl.cli import main as mmssl_main

    import shutil

    index = work / "serve_index"
    shutil.rmtree(index, ignore_errors=True)
    with contextlib.redirect_stdout(sys.stderr):   # its summary line would break the JSON on stdout
        assert mmssl_main(["index", "build", "--checkpoint", str(checkpoint), "--data", str(world / "val"),
                           "--out", str(index), "--workers", "1"]) == 0
    process, url = serve_load.start_server(index, threads=0, extra_args=["--rerank", "itm", "--rerank-k", str(RERANK_K)],
                                           log=work / "serve.log")     # a file: an unread pipe would fill
    try:
        out = {}
        for rerank_k in (0, RERANK_K):
            def request(http, rng, pool, rerank_k=rerank_k):
                body = {"text": pool[rng.randrange(len(pool))], "k": 10, "rerank_k": rerank_k}
                response = http.post("/search", json=body)
                return response.status_code == 200, response
            figures = serve_load.run_clients(url, clients, seconds, seed=rerank_k, request=request)
            out[f"rerank_k_{rerank_k}"] = {key: figures[key] for key in figures if not isinstance(figures[key], list)}
        return out
    finally:
        process.terminate()
        process.wait(timeout=30)


if __name__ == "__main__":
    main()
