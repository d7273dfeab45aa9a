"""The report as one static HTML page: inline CSS, images as relative paths inside DIR.

Relative paths (not absolute ones) so the folder can be moved, zipped or served as it is.
Every value that came from a file is escaped; nothing here computes a metric.
"""
from __future__ import annotations

import datetime
import html
from typing import Optional

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222; margin: 0;
       background: #f6f7f9; line-height: 1.45; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { margin-bottom: 4px; } h2 { margin-top: 36px; border-bottom: 2px solid #e3e6ea; padding-bottom: 4px; }
.subtitle { color: #555; margin-top: 0; }
.note { color: #555; font-size: 0.92em; max-width: 900px; }
table { border-collapse: collapse; margin: 8px 0 4px; font-size: 0.95em; }
th, td { border-bottom: 1px solid #e3e6ea; padding: 5px 12px; text-align: left; vertical-align: top; }
th { background: #f0f2f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.figures { display: flex; flex-wrap: wrap; gap: 24px; } .figures figure { flex: 0 1 520px; }
figure { margin: 8px 0; } figure img { max-width: 100%; border: 1px solid #e3e6ea; }
figcaption { color: #555; font-size: 0.9em; max-width: 760px; margin-top: 4px; }
.query { margin: 14px 0 20px; } .query h3 { margin: 0 0 6px; font-size: 1.02em; }
.hits { display: flex; gap: 12px; }
.hit { width: 150px; } .hit img { width: 128px; height: 128px; image-rendering: pixelated; border: 1px solid #ccc; }
.hit .caption { font-size: 0.82em; color: #333; } .hit .score { font-size: 0.78em; color: #777; }
pre { background: #f0f2f5; padding: 8px 10px; overflow-x: auto; font-size: 0.85em; margin: 2px 0 10px; white-space: pre-wrap; }
.step { margin-top: 10px; } .step .time { color: #777; font-size: 0.9em; }
"""


def esc(value) -> str:
    return html.escape(str(value))


def percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def render(sections: list[str], title: str, subtitle: str) -> str:
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{esc(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n"
        f"<h1>{esc(title)}</h1>\n<p class=\"subtitle\">{subtitle} · written {esc(stamp)}</p>\n"
        + "\n".join(sections) + "\n</main>\n</body>\n</html>\n"
    )


def section(anchor: str, heading: str, body: str) -> str:
    return f"<section id=\"{esc(anchor)}\">\n<h2>{esc(heading)}</h2>\n{body}\n</section>"


def table(header: list, rows: list, numeric_from: int = 1) -> str:
    """Cells from column `numeric_from` on are right-aligned numbers."""
    head = "".join(f"<th>{esc(cell)}</th>" for cell in header)
    body = []
    for row in rows:
        cells = "".join(
            f"<td class=\"num\">{esc(cell)}</td>" if i >= numeric_from else f"<td>{esc(cell)}</td>"
            for i, cell in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table>\n<tr>{head}</tr>\n" + "\n".join(body) + "\n</table>"


def figure(src: str, alt: str, caption: str, width: Optional[int] = None) -> str:
    """An image with its caption under it; the image links to itself at full size."""
    size = f" style=\"width:{width}px\"" if width else ""
    return (f"<figure><a href=\"{esc(src)}\"><img src=\"{esc(src)}\" alt=\"{esc(alt)}\"{size}></a>"
            f"<figcaption>{caption}</figcaption></figure>")


def query_block(query: str, hits: list) -> str:
    """One text query with its retrieved images in rank order, the caption under each image."""
    cells = []
    for hit in hits:
        cells.append(
            f"<div class=\"hit\"><img src=\"{esc(hit['image'])}\" alt=\"{esc(hit['caption'])}\">"
            f"<div class=\"caption\">{hit['rank']}. {esc(hit['caption'])}</div>"
            f"<div class=\"score\">cosine similarity {hit['score']:.3f}</div></div>"
        )
    return (f"<div class=\"query\"><h3>Query: “{esc(query)}”</h3>"
            f"<div class=\"hits\">{''.join(cells)}</div></div>")


def command_block(title: str, command: str, seconds: Optional[float]) -> str:
    took = f" <span class=\"time\">({seconds:.1f} s)</span>" if seconds else ""
    return f"<div class=\"step\">{esc(title)}{took}<pre>{esc(command)}</pre></div>"
