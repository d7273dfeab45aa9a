"""`mmssl report --dir DIR`: one readable HTML page from a quickstart folder's artefacts.

The report computes no metric itself: it plots `run/metrics.jsonl`, tabulates the JSON written by
`mmssl eval`, lays out the results of `mmssl index search`, shows the confusion matrix `mmssl eval
zeroshot --confusion` drew, and lists the commands of `DIR/quickstart.json`. So it can be
rebuilt alone at any time, and what it shows is exactly what the individual commands produced.
Writes `DIR/report.html`, `DIR/summary.json` and `DIR/figures/*`.
"""
from __future__ import annotations

import json
from pathlib import Path

from mmssl.report.artefacts import Artefacts, headline_metrics, read_artefacts

REPORT_FILE = "report.html"
SUMMARY_FILE = "summary.json"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report", help="write DIR/report.html from a quickstart folder's artefacts",
        description="Plots, metrics table, example queries, confusion matrix and the commands that "
        "made them, read from a folder laid out like `mmssl quickstart --out DIR` leaves it.",
    )
    parser.add_argument("--dir", type=Path, required=True, metavar="DIR", help="the quickstart output folder")
    parser.set_defaults(func=run)


def run(args) -> int:
    print(build_report(args.dir))
    return 0


def build_report(out: Path) -> Path:
    """Write report.html (and summary.json, figures) into `out`; returns the report's path."""
    from mmssl.report.sections import all_sections, subtitle
    from mmssl.report.page import render

    found = read_artefacts(Path(out))
    (found.out / SUMMARY_FILE).write_text(json.dumps(headline_metrics(found), indent=2) + "\n")
    text = render(all_sections(found), "mmssl quickstart report", subtitle(found))
    path = found.out / REPORT_FILE
    path.write_text(text, encoding="utf-8")
    return path


def summary_lines(out: Path) -> list[str]:
    """The few lines quickstart prints at the end (from summary.json, written by `build_report`)."""
    metrics = json.loads((Path(out) / SUMMARY_FILE).read_text())

    def pct(key):
        value = metrics.get(key)
        return "n/a" if value is None else f"{100 * value:.1f}%"

    return [
        f"zero-shot top-1 on val (seen colour-shape pairs, 48 classes): {pct('val_acc1')}",
        f"zero-shot top-1 on heldout (6 unseen pairs, 48 classes):     {pct('heldout_acc1')}",
        f"retrieval R@1 on val, text->image / image->text:             "
        f"{pct('image_retrieval_recall@1')} / {pct('text_retrieval_recall@1')}",
    ]


__all__ = ["Artefacts", "build_report", "read_artefacts", "register", "summary_lines"]
