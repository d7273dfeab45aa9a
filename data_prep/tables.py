"""Reading caption tables (CSV, TSV, JSONL, parquet) into a list of row dicts.

A file that cannot be read at all is the user's problem (UserError, exit 2); a single bad line
in it is a row problem (a BadRow that becomes a failures.jsonl entry), so one bad line never
sinks a large table.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from mmssl.errors import UserError

_DELIMITERS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
_JSON_LINES = (".jsonl", ".ndjson")
SUFFIXES = (*_DELIMITERS, *_JSON_LINES, ".parquet")


@dataclass
class BadRow:
    """A line of the table that could not be parsed into a row."""

    line: str
    reason: str


def read_table(path) -> tuple[list[str], list]:
    """(column names, rows): rows are dicts, or BadRow for a line that is not a valid record."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(f"cannot tell the format of {path}: expected one of {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise UserError(f"input file not found: {path}")
    try:
        if suffix == ".parquet":
            return _read_parquet(path)
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"cannot read {path}: not UTF-8 text") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    if suffix in _JSON_LINES:
        return _read_json_lines(text)
    return _read_delimited(text, _DELIMITERS[suffix], path)


def require_columns(columns: list[str], wanted: dict[str, str], path) -> None:
    """UserError naming the flag when a column it asks for is not in the table at all."""
    for flag, column in wanted.items():
        if column not in columns:
            raise UserError(f"{flag} {column!r} is not a column of {path} (columns: {', '.join(map(str, columns))})")


def _read_delimited(text: str, delimiter: str, path) -> tuple[list[str], list]:
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)  # quoted fields may span lines
    try:
        header = next(reader)
    except StopIteration:
        raise UserError(f"{path} is empty: no header line") from None
    except csv.Error as err:
        raise UserError(f"cannot parse the header of {path}: {err}") from None
    rows = []
    while True:
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            rows.append(BadRow(line=f"line {reader.line_num}", reason=f"unparseable line: {err}"))
            continue
        if not values:
            continue  # blank line
        # a short row leaves its missing columns out, so they fail as "missing column"
        rows.append(dict(zip(header, values)))
    return header, rows


def _read_json_lines(text: str) -> tuple[list[str], list]:
    columns, rows = {}, []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            rows.append(BadRow(line=line, reason=f"invalid JSON line: {err.msg}"))
            continue
        if not isinstance(record, dict):
            rows.append(BadRow(line=line, reason="JSON line is not an object"))
            continue
        columns.update(dict.fromkeys(record))
        rows.append(record)
    return list(columns), rows


def _read_parquet(path: Path) -> tuple[list[str], list]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a bad file
        raise UserError(f"cannot read {path} as parquet: {' '.join(str(err).split())}") from None
    return table.column_names, table.to_pylist()
