"""`mmssl prep export-clip-benchmark`: mmssl shards -> CLIP_benchmark's webdataset layout.

Writes one split of OUT in the layout CLIP_benchmark's `wds/NAME` datasets read (and that
`mmssl eval` reads too, see `mmssl.data.benchmark_layout`):

    OUT/SPLIT/0.tar ... OUT/SPLIT/nshards.txt
    OUT/classnames.txt, OUT/zeroshot_classification_templates.txt   (copied from the data folder's
                                                 classnames.txt / templates.txt, `{}` written `{c}`)
    OUT/dataset_type.txt                         classification, or retrieval for a captioned set

Each sample becomes `s0000000`, ... (in input order) with its image bytes unchanged (so both
tools decode the same pixels), `.cls` holding the label, and `.txt` holding its captions one per
line (a newline inside a caption written `\\n`, as CLIP_benchmark's own writer does). Samples
that cannot be evaluated (unreadable image, no label or caption, a shard shorter than its
manifest) are left out and counted. The split is written under a hidden temporary name and
renamed into place, so a killed export leaves either the whole split or none of it; every file
goes through `data_prep.shards.atomic_write`. OUT must be empty, absent, or a CLIP_benchmark
folder (another split is added beside the ones there); a split or a top-level file that already
exists with other content is replaced only with `--overwrite`.
"""
from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Iterator, Optional

from mmssl.data.benchmark_layout import (CLASSNAMES_FILE, DATASET_TYPES, NSHARDS_FILE, TEMPLATES_FILE, TYPE_FILE,
                                         is_root)
from mmssl.errors import UserError

from data_prep.shards import TMP_SUFFIX, _tar_end, _tar_member, atomic_write, atomic_write_text

SOURCE_CLASSNAMES, SOURCE_TEMPLATES = "classnames.txt", "templates.txt"
DEFAULT_SHARD_SIZE = 10_000   # CLIP_benchmark's writer's default --max-count
OLD_SUFFIX = ".old"


def export(data: str, out, split: str = "test", dataset_type: str = "auto", shard_size: int = DEFAULT_SHARD_SIZE,
           overwrite: bool = False, quiet: bool = False) -> dict:
    """Write `data` (mmssl shards) as split `split` of the CLIP_benchmark folder `out`; returns a
    summary: samples written and skipped (with reasons), shards, dataset type, class count."""
    from mmssl.data.benchmark_layout import find_split

    if dataset_type not in ("auto", *DATASET_TYPES):
        raise UserError(f"--dataset-type must be auto or {' or '.join(DATASET_TYPES)}, got {dataset_type!r}")
    if shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, got {shard_size}")
    if find_split(str(data)) is not None:
        raise UserError(f"{data} is already in CLIP_benchmark's layout")
    out = Path(out)
    _check_output(out, split, overwrite)
    classnames, templates = _label_files(data)
    top_files = {}
    if classnames:
        top_files[CLASSNAMES_FILE] = "".join(f"{name}\n" for name in classnames)
    if templates:
        top_files[TEMPLATES_FILE] = "".join(f"{template}\n" for template in templates)
    _check_top_files(out, top_files, overwrite)

    staging = out / f".{split}{TMP_SUFFIX}"
    _remove_tree(staging)
    _make_folder(staging)
    try:
        tally = _Tally()
        num_shards = _write_shards(staging, _read_samples(data, tally, quiet), shard_size, tally)
        if not tally.written:
            raise UserError(f"no usable samples in {data} ({len(tally.skipped)} skipped)")
        kind = _dataset_type(tally, dataset_type, data)
        _check_labels(tally, classnames, data)
        top_files[TYPE_FILE] = kind + "\n"
        _check_top_files(out, top_files, overwrite)
        atomic_write_text(staging / NSHARDS_FILE, f"{num_shards}\n")
        for name, text in top_files.items():
            atomic_write_text(out / name, text)
        _move_into_place(staging, out / split)
    finally:
        _remove_tree(staging)
    return {"out": str(out), "split": split, "dataset_type": kind, "num_samples": tally.written,
            "num_shards": num_shards, "num_classes": len(classnames) if classnames else None,
            "num_templates": len(templates) if templates else None, "skipped": tally.skipped}


def summary_line(summary: dict) -> str:
    skipped = summary["skipped"]
    first = "; ".join(f"{key}: {reason}" for key, reason in skipped[:3])
    more = f" ({first}{'; ...' if len(skipped) > 3 else ''})" if skipped else ""
    classes = f", {summary['num_classes']} classes" if summary["num_classes"] else ""
    return (f"prep export-clip-benchmark: {summary['num_samples']} samples written, {len(skipped)} skipped{more} -> "
            f"{Path(summary['out']) / summary['split']} ({summary['num_shards']} shard{'s' * (summary['num_shards'] != 1)}, "
            f"{summary['dataset_type']}{classes})")


# --- reading ---------------------------------------------------------------------------------


@dataclass
class _Tally:
    """What the export has seen: samples written, skipped (key, reason), and what they lack."""

    written: int = 0
    skipped: list = field(default_factory=list)
    unlabelled: int = 0
    uncaptioned: int = 0
    labels: set = field(default_factory=set)


def _read_samples(data: str, tally: _Tally, quiet: bool) -> Iterator[tuple]:
    """(image extension, image bytes, label or None, captions) per usable sample, in input order;
    the others go to `tally.skipped` with their reason."""
    from tqdm import tqdm

    from mmssl.data.image_guard import SHARD_LIMITS, admit_image
    from mmssl.data.samples import IMAGE_EXTENSIONS, CorruptSample, LostSamples, eval_targets, shard_samples
    from mmssl.data.sources import resolve_shards, total_samples

    shards = resolve_shards(data)
    with tqdm(total=total_samples(shards), desc="export", unit="sample", disable=True if quiet else None,
              file=sys.stderr) as progress:
        for shard in shards:
            for raw in shard_samples(shard.url, 0, shard.count):
                if isinstance(raw, LostSamples):
                    tally.skipped.append((Path(raw.url).name, f"{raw.count} samples missing from the shard"))
                    progress.update(raw.count)
                    continue
                progress.update(1)
                extension = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
                try:
                    if extension is None:
                        raise CorruptSample("no image")
                    label, captions = eval_targets(raw)
                    admit_image(raw[extension], SHARD_LIMITS)
                except Exception as err:  # anything wrong with one sample is a property of the data
                    tally.skipped.append((raw["__key__"], str(err) or type(err).__name__))
                    continue
                yield extension, raw[extension], label, captions


def _label_files(data: str) -> tuple[Optional[list[str]], Optional[list[str]]]:
    """The data folder's classnames.txt and templates.txt (each None when absent), templates
    rewritten with CLIP_benchmark's `{c}` placeholder."""
    folder = Path(str(data).split("::")[0])
    if "{" in folder.name or folder.suffix == ".tar":
        folder = folder.parent
    classnames = _lines(folder / SOURCE_CLASSNAMES)
    templates = _lines(folder / SOURCE_TEMPLATES)
    return classnames, [_benchmark_template(line, folder / SOURCE_TEMPLATES) for line in templates or []] or None


def _lines(path: Path) -> Optional[list[str]]:
    if not path.is_file():
        return None
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    return lines or None


def _benchmark_template(line: str, where: Path) -> str:
    """`{}` or `{c}` -> `{c}`. CLIP_benchmark fills templates with `str.format(c=name)`, so any other
    brace would break it (or mean something else there): refused."""
    template = line.replace("{}", "{c}")
    rest = template.replace("{c}", "")
    if "{c}" not in template or "{" in rest or "}" in rest:
        raise UserError(f"{where}: template {line[:80]!r} needs one {{}} (or {{c}}) placeholder and no other braces")
    return template


def _dataset_type(tally: _Tally, wanted: str, data: str) -> str:
    if wanted == "auto":
        wanted = "classification" if not tally.unlabelled else "retrieval"
    if wanted == "classification" and tally.unlabelled:
        raise UserError(f"{data}: {tally.unlabelled} of {tally.written} samples have no label (json 'label'); "
                        "a classification set needs one per sample")
    if wanted == "retrieval" and tally.uncaptioned:
        raise UserError(f"{data}: {tally.uncaptioned} of {tally.written} samples have no caption; "
                        "a retrieval set needs captions for every sample")
    return wanted


def _check_labels(tally: _Tally, classnames: Optional[list], data: str) -> None:
    labels = tally.labels
    if labels and classnames and not 0 <= min(labels) <= max(labels) < len(classnames):
        raise UserError(f"{data}: labels {min(labels)}..{max(labels)} do not fit the {len(classnames)} class names "
                        f"of its {SOURCE_CLASSNAMES}")


# --- writing ---------------------------------------------------------------------------------


def _write_shards(staging: Path, samples: Iterator[tuple], shard_size: int, tally: _Tally) -> int:
    """Shards 0.tar, 1.tar, ... of `shard_size` samples each, streamed (one sample in memory at a time)."""
    samples = iter(samples)
    shard = 0
    while (first := next(samples, None)) is not None:
        atomic_write(staging / f"{shard}.tar", _shard_chunks(chain([first], islice(samples, shard_size - 1)), tally))
        shard += 1
    return shard


def _shard_chunks(samples, tally: _Tally) -> Iterator[bytes]:
    written = 0
    for sample in samples:
        members = _sample_members(tally.written, sample)
        tally.written += 1
        tally.unlabelled += sample[2] is None
        tally.uncaptioned += not sample[3]
        if sample[2] is not None:
            tally.labels.add(sample[2])
        written += len(members)
        yield members
    yield _tar_end(written)


def _sample_members(index: int, sample) -> bytes:
    """One sample's tar members under CLIP_benchmark's key: image, `.cls`, `.txt` (those it has)."""
    extension, image, label, captions = sample
    key = f"s{index:07d}"
    members = _tar_member(f"{key}.{extension}", image)
    if label is not None:
        members += _tar_member(f"{key}.cls", str(label).encode("ascii"))
    if captions:
        text = "\n".join(caption.replace("\n", "\\n") for caption in captions)
        members += _tar_member(f"{key}.txt", text.encode("utf-8"))
    return members


def _check_output(out: Path, split: str, overwrite: bool) -> None:
    """OUT absent, empty or a CLIP_benchmark folder; OUT/SPLIT absent unless overwriting."""
    if "/" in split or split.startswith(".") or not split:
        raise UserError(f"--split must be a plain folder name, got {split!r}")
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a folder")
    if out.is_dir():
        ours = [entry for entry in out.iterdir() if not _is_staging(entry)]
        if ours and not is_root(out):
            raise UserError(f"output folder {out} is not empty and is not a CLIP_benchmark folder; "
                            "choose another --out")
    if (out / split).exists() and not overwrite:
        raise UserError(f"{out / split} exists; pass --overwrite to replace that split")
    _make_folder(out)


def _check_top_files(out: Path, files: dict, overwrite: bool) -> None:
    """A top-level file already there describes the splits beside it: replaced only when equal, or
    with --overwrite."""
    if overwrite:
        return
    for name, text in files.items():
        path = out / name
        if path.is_file() and path.read_bytes() != text.encode("utf-8"):
            raise UserError(f"{path} exists with other content (it describes the splits already in {out}); "
                            "pass --overwrite to replace it")


def _move_into_place(staging: Path, target: Path) -> None:
    old = target.with_name(f".{target.name}{OLD_SUFFIX}")
    try:
        if target.exists():
            _remove_tree(old)
            target.rename(old)
        staging.rename(target)
    except OSError as err:
        raise UserError(f"cannot move the new split into {target}: {err.strerror or err}") from None
    _remove_tree(old)


def _is_staging(entry: Path) -> bool:
    return entry.name.startswith(".") and entry.name.endswith((TMP_SUFFIX, OLD_SUFFIX))


def _make_folder(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create output folder {path}: {err.strerror or err}") from None


def _remove_tree(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise UserError(f"cannot remove {path}: {err.strerror or err}") from None
