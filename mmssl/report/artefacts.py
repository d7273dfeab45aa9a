"""Reading what the quickstart steps left in DIR, by the paths their flags named.

The report only reads files: the metrics log of `mmssl train`, the JSON of `mmssl eval`, the
search results of `mmssl index search` and the plan quickstart wrote. Anything missing is simply
absent from the report (a folder made by hand with only some steps still gets a page).
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mmssl.errors import UserError
from mmssl.models.refs import run_checkpoint


@dataclass
class Artefacts:
    out: Path
    datasets: dict = field(default_factory=dict)          # split -> manifest.json of data/<split>
    metrics: list = field(default_factory=list)          # metrics.jsonl records, in step order
    zeroshot: dict = field(default_factory=dict)          # split -> eval zeroshot JSON
    per_class: dict = field(default_factory=dict)         # split -> rows of the per-class CSV
    retrieval: Optional[dict] = None                      # eval retrieval JSON on val
    searches: list = field(default_factory=list)          # index search JSONs, in query order
    plan: Optional[dict] = None                           # quickstart.json
    train_config: Optional[dict] = None                   # the resolved config stored in the checkpoint
    checkpoint: Optional[Path] = None
    confusion: Optional[Path] = None                      # the val confusion-matrix PNG from eval


def read_artefacts(out: Path) -> Artefacts:
    if not out.is_dir():
        raise UserError(f"--dir {out} is not a folder (run `mmssl quickstart --out {out}` first)")
    found = Artefacts(out=out)
    for split in ("train", "val", "heldout"):
        manifest = _read_json(out / "data" / split / "manifest.json")
        if manifest is not None:
            found.datasets[split] = manifest
    metrics_file = out / "run" / "metrics.jsonl"
    if metrics_file.is_file():
        found.metrics = sorted(_read_jsonl(metrics_file), key=lambda record: record["step"])
    for split in ("val", "heldout"):
        result = _read_json(out / "eval" / f"zeroshot_{split}.json")
        if result is not None:
            found.zeroshot[split] = result
        table = out / "eval" / f"per_class_{split}.csv"
        if table.is_file():
            with table.open(newline="") as handle:
                found.per_class[split] = list(csv.DictReader(handle))
    found.retrieval = _read_json(out / "eval" / "retrieval_val.json")
    found.searches = [_read_json(path) for path in sorted((out / "search").glob("*.json"))]
    found.plan = _read_json(out / "quickstart.json")
    checkpoint = run_checkpoint(out / "run")
    if checkpoint.exists():
        from mmssl.models.refs import read_checkpoint

        found.checkpoint = checkpoint.resolve()
        found.train_config = read_checkpoint(checkpoint)["config"]
    confusion = out / "figures" / "confusion_val.png"
    found.confusion = confusion if confusion.is_file() else None
    return found


def headline_metrics(found: Artefacts) -> dict:
    """The few numbers the summary and summary.json carry (None where a step did not run)."""
    def zeroshot(split: str, key: str):
        return found.zeroshot.get(split, {}).get("metrics", {}).get(key)

    retrieval = (found.retrieval or {}).get("metrics", {})
    last = found.metrics[-1] if found.metrics else {}
    return {
        "val_acc1": zeroshot("val", "acc1"),
        "val_acc5": zeroshot("val", "acc5"),
        "heldout_acc1": zeroshot("heldout", "acc1"),
        "heldout_acc5": zeroshot("heldout", "acc5"),
        "image_retrieval_recall@1": retrieval.get("image_retrieval_recall@1"),
        "text_retrieval_recall@1": retrieval.get("text_retrieval_recall@1"),
        "train_steps": last.get("step"),
        "final_loss": last.get("loss"),
    }


def _read_json(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None


def _read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
