"""`mmssl eval suite`: many models on many eval sets in one process, each model loaded once.

The datasets file lists one evaluation per line (see `parse_datasets_file` for the format). Every
(model, line) pair writes one JSON in the shape `mmssl eval` prints (CLIP_benchmark's), named
after the model, the task, the data and a digest of what identifies the pair (the checkpoint's
canonical path with its size and modification time, the task, the data paths and options). A
pair whose JSON exists and is valid for that identity is skipped, so a killed suite rerun does only
what is left and ends with the same table; JSONs are written atomically. At the end the JSONs of
this suite's pairs, in file order, become one table as `results.csv` and `results.md`: one row
per JSON with CLIP_benchmark `build`'s columns (the metrics, every other field, `model_fullname`
= model + " " + pretrained), in a fixed order.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from mmssl.data.urls import check_url, read_text
from mmssl.errors import UserError

# task word in the file -> (CLIP_benchmark's task name, data paths, options the line may set)
TASKS = {
    "zeroshot": ("zeroshot_classification", 1, ("name", "split", "classnames", "templates")),
    "retrieval": ("zeroshot_retrieval", 1, ("name", "split")),
    "linear-probe": ("linear_probe", 2, ("name", "seed")),
}
TASK_ALIASES = {"zeroshot_classification": "zeroshot", "zeroshot_retrieval": "retrieval", "linear_probe": "linear-probe"}
RESULTS_CSV, RESULTS_MD = "results.csv", "results.md"
LEADING_COLUMNS = ("model_fullname", "model", "pretrained", "dataset", "task")
MAX_FILE_BYTES = 1 * 2**20       # a datasets file
MAX_RESULT_BYTES = 16 * 2**20    # one result JSON (per-class fields included)
_OPTION = re.compile(r"^([a-z][a-z-]*)=(.*)$", re.DOTALL)
_BUNDLED = {"classnames": ("imagenet", "cifar10", "cifar100"), "templates": ("openai", "simple")}


@dataclass(frozen=True)
class SuiteLine:
    """One evaluation of the datasets file: the task, its data (resolved), its options."""

    number: int                  # line number in the file, for messages
    task: str                    # zeroshot | retrieval | linear-probe
    data: tuple                  # one path/URL (zeroshot, retrieval) or (train, test)
    written: tuple               # the data as written in the file: what the results name
    options: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The result's `dataset`: name=..., else the (test) data as written in the file."""
        return self.options.get("name") or self.written[-1]

    @property
    def benchmark_task(self) -> str:
        return TASKS[self.task][0]


def parse_datasets_file(path: str | Path) -> list[SuiteLine]:
    """The evaluations a datasets file lists. One per line, `#` starts a comment, blank lines skipped:

        TASK DATA [key=value ...]            TASK: zeroshot | retrieval
        linear-probe TRAIN TEST [key=value ...]

    Options: `name=` (the result's dataset name; default the data as written), `split=` (a
    CLIP_benchmark folder's split; zeroshot, retrieval), `classnames=` / `templates=` (zeroshot:
    a file or a bundled set, as `mmssl eval zeroshot`), `seed=` (linear-probe). Words are split as
    a shell would (quotes for spaces; nothing is run). Relative paths are relative to the file's
    folder. Errors name the file and line.
    """
    check_url(str(path), allow_remote=False, where="--datasets")   # a local file: never fetched
    path = Path(path)
    text = read_text(str(path), MAX_FILE_BYTES)
    lines, seen = [], {}
    for number, raw in enumerate(text.splitlines(), start=1):
        where = f"{path}:{number}"
        try:
            words = shlex.split(raw, comments=True)
        except ValueError as err:
            raise UserError(f"{where}: {err}") from None
        if not words:
            continue
        line = _parse_line(words, number, path.parent, where)
        key = (line.task, line.name)
        if key in seen:
            raise UserError(f"{where}: {line.task} on {line.name!r} is already line {seen[key]}; "
                            "give one of them another name=")
        seen[key] = number
        lines.append(line)
    if not lines:
        raise UserError(f"{path}: no evaluations listed (lines like 'zeroshot DATA')")
    return lines


def _parse_line(words: list, number: int, folder: Path, where: str) -> SuiteLine:
    task = TASK_ALIASES.get(words[0], words[0])
    if task not in TASKS:
        raise UserError(f"{where}: unknown task {words[0]!r} (one of {', '.join(TASKS)})")
    _, num_data, allowed = TASKS[task]
    positional = [word for word in words[1:] if not _OPTION.match(word)]
    options = {}
    for word in words[1:]:
        match = _OPTION.match(word)
        if not match:
            continue
        key, value = match.groups()
        if key not in allowed:
            raise UserError(f"{where}: {task} takes no option {key!r} (it takes {', '.join(allowed)})")
        if key in options:
            raise UserError(f"{where}: option {key!r} given twice")
        if not value:
            raise UserError(f"{where}: option {key!r} needs a value")
        options[key] = value
    if words[1:1 + len(positional)] != positional:
        raise UserError(f"{where}: options (key=value) go after the data")
    if len(positional) != num_data:
        wanted = "TRAIN TEST" if num_data == 2 else "DATA"
        raise UserError(f"{where}: {task} takes {wanted}, got {len(positional)} path(s)")
    if "seed" in options:
        try:
            options["seed"] = int(options["seed"])
        except ValueError:
            raise UserError(f"{where}: seed must be a whole number, got {options['seed']!r}") from None
    for key in ("classnames", "templates"):
        if key in options and options[key] not in _BUNDLED[key]:
            options[key] = _resolve(options[key], folder)
    data = tuple(_resolve(word, folder) for word in positional)
    for item in data:
        if _is_local(item) and "{" not in item and "::" not in item and not Path(item).exists():
            raise UserError(f"{where}: data not found: {item}")
    return SuiteLine(number, task, data, tuple(positional), options)


def _resolve(word: str, folder: Path) -> str:
    """A path relative to the datasets file's folder; URLs and absolute paths as written."""
    if not _is_local(word) or Path(word).expanduser().is_absolute():
        return word
    return "::".join(str(folder / part) for part in word.split("::"))


def _is_local(word: str) -> bool:
    from mmssl.data.urls import scheme_of

    return scheme_of(word) in (None, "file")


# --- identity and resuming ---------------------------------------------------------------------


def model_identity(checkpoint: str) -> dict:
    """What names a model for resuming: its canonical reference, and the size and modification
    time of the file it reads (so a checkpoint rewritten in place is evaluated again)."""
    from mmssl.models.refs import checkpoint_ref

    ref = checkpoint_ref(checkpoint)
    file = ref.path if ref.is_checkpoint else ref.weights
    stat = Path(file).resolve().stat() if file is not None else None
    return {"model": ref.canonical, "size": stat and stat.st_size, "mtime_ns": stat and stat.st_mtime_ns}


def result_path(out: Path, checkpoint: str, model: dict, line: SuiteLine) -> Path:
    """OUT/<model>__<task>__<data>__<digest>.json: readable, and unique per (model, line) identity."""
    identity = {"model": model, "task": line.task, "data": line.data, "options": line.options, "name": line.name}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return out / f"{_slug(checkpoint)}__{line.task}__{_slug(line.name)}__{digest}.json"


def finished_result(path: Path, line: SuiteLine) -> Optional[dict]:
    """The JSON at `path` when it is a complete result of `line`'s task and data, else None."""
    if not path.is_file():
        return None
    try:
        result = json.loads(read_text(str(path), MAX_RESULT_BYTES))
    except (ValueError, UserError):
        return None
    if (isinstance(result, dict) and isinstance(result.get("metrics"), dict) and result["metrics"]
            and result.get("task") == line.benchmark_task and result.get("dataset") == line.name):
        return result
    return None


def _slug(text: str) -> str:
    tail = "-".join(Path(text.rstrip("/")).parts[-2:]) if _is_local(text) else text
    return re.sub(r"[^A-Za-z0-9._-]+", "-", tail).strip("-.")[:60] or "x"


# --- running -------------------------------------------------------------------------------------


def run_suite(checkpoints: Sequence[str], datasets_file: str | Path, out: str | Path, *, batch_size: int = 256,
              workers: int = 2, precision: str = "auto", allow_remote: bool = False,
              log=sys.stderr) -> list[dict]:
    """Evaluate every checkpoint on every line (models in order, each loaded once and only when a
    pair of it is left to do); returns the results in table order and writes the table."""
    from data_prep.shards import atomic_write_text

    from eval.cli import result_text

    lines = parse_datasets_file(datasets_file)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create --out {out}: {err.strerror or err}") from None
    results = []
    total, done = len(checkpoints) * len(lines), 0
    for checkpoint in checkpoints:
        model = model_identity(checkpoint)
        paths = [result_path(out, checkpoint, model, line) for line in lines]
        loaded = None
        for line, path in zip(lines, paths):
            done += 1
            result = finished_result(path, line)
            if result is None:
                if loaded is None:
                    loaded = _load(checkpoint, precision)
                log.write(f"suite [{done}/{total}] {checkpoint}: {line.task} {line.name}\n")
                result = _as_stored(_evaluate(loaded, line, batch_size, workers, allow_remote, datasets_file))
                atomic_write_text(path, result_text(result) + "\n")
            else:
                log.write(f"suite [{done}/{total}] {checkpoint}: {line.task} {line.name} (done before, kept)\n")
            results.append(result)
        del loaded
    atomic_write_text(out / RESULTS_CSV, csv_table(results))
    atomic_write_text(out / RESULTS_MD, markdown_table(results))
    return results


def _load(checkpoint: str, precision: str):
    from eval.embed import load_model

    return load_model(checkpoint, precision)


def _evaluate(loaded, line: SuiteLine, batch_size: int, workers: int, allow_remote: bool, datasets_file) -> dict:
    """One line's evaluation, as `mmssl eval TASK` runs it; the result names the data as written."""
    try:
        if line.task == "zeroshot":
            from eval.zeroshot import run_zeroshot

            result = run_zeroshot(loaded, line.data[0], line.options.get("classnames"), line.options.get("templates"),
                                  batch_size, workers, allow_remote, line.options.get("split"))["result"]
        elif line.task == "retrieval":
            from eval.retrieval import run_retrieval

            result = run_retrieval(loaded, line.data[0], batch_size, workers, allow_remote=allow_remote,
                                   split=line.options.get("split"))["result"]
        else:
            from eval.linear_probe import run_linear_probe

            result = run_linear_probe(loaded, line.data[0], line.data[1], batch_size, workers,
                                      line.options.get("seed", 0), allow_remote=allow_remote)
            result["train_dataset"] = line.written[0]
    except UserError as err:
        raise UserError(f"{datasets_file}:{line.number}: {err}") from None
    result["dataset"] = line.name
    return result


def _as_stored(result: dict) -> dict:
    """The result as the JSON will hold it (NaN as null), so a fresh and a resumed table agree."""
    from eval.cli import result_text

    return json.loads(result_text(result))


# --- the table -----------------------------------------------------------------------------------


def table_rows(results: Sequence[dict]) -> list[dict]:
    """CLIP_benchmark `build`'s rows: the metrics, then every other field, then model_fullname."""
    rows = []
    for result in results:
        row = dict(result["metrics"])
        row.update({key: value for key, value in result.items() if key != "metrics"})
        row["model_fullname"] = f"{result['model']} {result['pretrained']}"
        rows.append(row)
    return rows


def table_columns(results: Sequence[dict]) -> list[str]:
    """The leading columns, then the metrics, then the other fields, each in first-seen order."""
    metrics = {key: None for result in results for key in result["metrics"]}
    others = {key: None for result in results for key in result
              if key != "metrics" and key not in metrics and key not in LEADING_COLUMNS}
    return [*LEADING_COLUMNS, *metrics, *others]


def csv_table(results: Sequence[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=table_columns(results), lineterminator="\n")
    writer.writeheader()
    writer.writerows(table_rows(results))
    return buffer.getvalue()


def markdown_table(results: Sequence[dict]) -> str:
    columns = table_columns(results)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table_rows(results):
        lines.append("| " + " | ".join(_cell(row.get(column)) for column in columns) + " |")
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")
