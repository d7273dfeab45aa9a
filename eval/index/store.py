"""The index folder: `index.faiss`, `metadata.parquet` and `index_info.json`, saved and loaded as one.

index_info.json says what was built and why (type, parameters, memory estimate, tuned search
knob, measured recall, timings), which model embeds queries (`model`: a checkpoint path or an
`openclip:` spec, or null for an index of foreign embeddings), and what ties the three files
together: the row count, a SHA-256 over the keys in id order, and the size and SHA-256 of
`index.faiss` and `metadata.parquet`. Loading checks all of them before FAISS parses a byte, so
an `index.faiss` from another build (same count, other vectors) is refused instead of silently
answering with the wrong rows, and re-applies the tuned search knob.

Index folders are shared like datasets, so the info file is validated as untrusted input too
(types, the search knob's name and range), and the file sizes bound what loading may allocate.

Saving builds the folder under a temporary name beside `--out` and swaps it in with renames at
the end, so a rebuild that fails or is killed leaves the previous index whole.

Modalities (clip-retrieval's image and text indices): `index.faiss` holds the image embeddings;
a folder built with `--modality image,text` also holds `text_index.faiss`, the caption embeddings
of the same rows under the same ids, so a caption hit shows its image and metadata like an image
hit. `info["modalities"]` lists what the folder holds (absent: image only).

On-disk lists (`--on-disk`, IVF kinds): the image index's inverted lists live in
`index.ivfdata` (FAISS' OnDiskInvertedLists) and `index.faiss` keeps only the coarse quantizer and
the lists' offsets; `info["on_disk"]` is true and the list file is checked like the others.
`index.faiss` names its list file by base name and is read with IO_FLAG_ONDISK_SAME_DIR, so the
folder moves as a unit; the lists are memory-mapped read-only, so searching pages in the cells it
probes (the OS page cache holds them) instead of loading every list into the process. The
caption index stays in memory.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from data_prep.input_hash import file_sha256
from eval.index.metadata import METADATA_FILE, Metadata, load_metadata, write_metadata
from mmssl.errors import UserError

INDEX_FILE = "index.faiss"
TEXT_INDEX_FILE = "text_index.faiss"
INFO_FILE = "index_info.json"
IVFDATA_FILE = "index.ivfdata"      # the image index's inverted lists, with --on-disk
GROWN_LISTS_FILE = "lists.growing"  # where an --on-disk build adds to its lists (staging only)
FOLDER_FILES = (INDEX_FILE, TEXT_INDEX_FILE, METADATA_FILE, INFO_FILE, IVFDATA_FILE)
MODALITIES = ("image", "text")
INDEX_FILES = {"image": INDEX_FILE, "text": TEXT_INDEX_FILE}    # modality -> its FAISS file
FORMAT_VERSION = 2
MAX_INFO_BYTES = 16 * 2**20
SEARCH_PARAMS = {"efSearch": 1 << 16, "nprobe": 1 << 24}   # knob -> largest value accepted from a file


@dataclass
class IndexFolder:
    index: object            # faiss.Index of the image embeddings, tuned search parameter applied
    metadata: Metadata
    info: dict
    path: Path
    text_index: object = None   # faiss.Index of the caption embeddings (same ids), or None

    @property
    def model(self) -> str | None:
        return self.info.get("model")

    @property
    def modalities(self) -> tuple[str, ...]:
        return modalities_of(self.info)

    def index_for(self, modality: str):
        """The FAISS index that answers searches of `modality` ("image": search the images,
        "text": search the captions); UserError when the folder was built without it."""
        if modality == "image":
            return self.index
        if modality == "text" and self.text_index is not None:
            return self.text_index
        raise UserError(f"{self.path.name} holds no {modality} index (it has: {', '.join(self.modalities)}); "
                        "build it with `mmssl index build --modality image,text`")


def modalities_of(info: dict) -> tuple[str, ...]:
    return tuple(info.get("modalities") or ("image",))


def save_index_folder(out_dir: str | Path, index, info: dict, metadata: pa.Table, model: str | None,
                      text_index=None, on_disk: bool = False) -> dict:
    """Write the files into a fresh folder and swap it in for `out_dir`; returns the info dict as
    written (with file sizes and checksums). `text_index` (caption embeddings, same ids) is
    optional. `on_disk` (IVF only) moves `index`'s lists into index.ivfdata: `index` then reads
    them from that file. UserError when `out_dir` holds anything that is not an index folder (it
    is never deleted)."""
    import faiss

    out = Path(out_dir)
    recover_interrupted_build(out)
    _check_replaceable(out)
    for built in (index, text_index):
        if built is not None and metadata.num_rows != built.ntotal:
            raise ValueError(f"metadata has {metadata.num_rows} rows for {built.ntotal} vectors")
    staging = staging_folder(out)
    grown = staging / GROWN_LISTS_FILE
    built_on_disk = on_disk and _lists_path(index) == grown
    if not built_on_disk:
        shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True, exist_ok=built_on_disk)
        data_files = [INDEX_FILE, METADATA_FILE]
        if on_disk:
            moving = time.perf_counter()
            # lists grown on disk keep the slack of every resize; the copy packs them (reading
            # through the page cache, so memory stays bounded either way)
            move_lists_on_disk(index, staging / IVFDATA_FILE)
            grown.unlink(missing_ok=True)
            data_files.append(IVFDATA_FILE)
            info = {**info, "timings_s": {**info.get("timings_s", {}),
                                          "move_on_disk": round(time.perf_counter() - moving, 3)}}
        with _lists_named_by_base_name(index):
            faiss.write_index(index, str(staging / INDEX_FILE))
        if text_index is not None:
            faiss.write_index(text_index, str(staging / TEXT_INDEX_FILE))
            data_files.append(TEXT_INDEX_FILE)
        checksum = write_metadata(staging, metadata)
        info = {"format_version": FORMAT_VERSION, **info, "model": model, "keys_sha256": checksum,
                "modalities": list(MODALITIES if text_index is not None else ("image",)), "on_disk": on_disk,
                "files": {name: {"bytes": (staging / name).stat().st_size, "sha256": file_sha256(staging / name)}
                          for name in data_files}}
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        for name in data_files + [INFO_FILE]:
            _fsync_file(staging / name)
        _swap_in(staging, out)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"cannot write the index folder {out}: {err.strerror or err}; "
                        "the previous one (if any) is unchanged") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return info


def staging_folder(out: Path) -> Path:
    """Where this process builds the folder that replaces `out` (a killed build's is cleaned up by
    recover_interrupted_build)."""
    return out.parent / f".{out.name}.building-{os.getpid()}"


def lists_file_for(out_dir: str | Path) -> Path:
    """The file an `--on-disk` build grows its lists in while it runs, inside the staging folder
    that save_index_folder packs into index.ivfdata and swaps in: the lists never sit in memory."""
    out = Path(out_dir)
    recover_interrupted_build(out)
    _check_replaceable(out)
    staging = staging_folder(out)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging / GROWN_LISTS_FILE


def attach_lists_on_disk(index, path: Path) -> None:
    """Give the trained, empty IVF `index` empty OnDiskInvertedLists at `path`: every add (and
    every merged part) then goes into that file, through the page cache."""
    import faiss

    ivf = _ivf_of(index)
    if ivf.ntotal:
        raise ValueError("on-disk lists are attached to the trained, empty index")
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(path))
    ivf.replace_invlists(lists, True)
    lists.this.disown()           # the index owns (and frees) the lists now


def _ivf_of(index):
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        raise UserError("--on-disk needs an IVF index (ivf_flat or opq_ivf_pq)") from None


def _on_disk_lists(index):
    """The index's OnDiskInvertedLists, or None (not IVF, or lists in memory)."""
    import faiss

    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return None
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None


def _lists_path(index) -> Path | None:
    lists = _on_disk_lists(index)
    return Path(lists.filename) if lists is not None else None


@contextlib.contextmanager
def _lists_named_by_base_name(index):
    """While index.faiss is written, its on-disk lists are named by base name only, to be found
    beside it (IO_FLAG_ONDISK_SAME_DIR) wherever the folder moves; the full path is needed again
    after, should the index grow."""
    lists = _on_disk_lists(index)
    if lists is None:
        yield
        return
    full = lists.filename
    lists.filename = Path(full).name
    try:
        yield
    finally:
        lists.filename = full


def move_lists_on_disk(index, path: Path) -> None:
    """Copy the IVF `index`'s inverted lists into an OnDiskInvertedLists file at `path` and make
    the index use it (the in-memory lists are freed). The file is named by its base name only, to
    be found beside index.faiss (IO_FLAG_ONDISK_SAME_DIR) wherever the folder moves."""
    import faiss

    ivf = _ivf_of(index)
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(path))
    sources = faiss.InvertedListsPtrVector()
    sources.push_back(ivf.invlists)
    with quiet_c_stdout():       # FAISS printf()s each resize of the file
        lists.merge_from_multiple(sources.data(), sources.size(), False)
    ivf.replace_invlists(lists, True)
    lists.this.disown()           # the index owns (and frees) the lists now


@contextlib.contextmanager
def quiet_c_stdout():
    """Send what C code prints to stdout during the block to /dev/null (FAISS' on-disk lists
    report file moves with printf, which would land in the middle of a command's output)."""
    import ctypes

    sys.stdout.flush()
    libc = ctypes.CDLL(None)
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _check_replaceable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in FOLDER_FILES)
        if foreign:
            raise UserError(f"--out {out} holds files that are not part of an index folder "
                            f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); choose another folder")


def recover_interrupted_build(out: Path) -> None:
    """Undo what a killed build left beside `out`: its staging folder goes; an old index moved
    aside just before the kill (`out` missing) moves back."""
    for leftover in sorted(out.parent.glob(f".{out.name}.building-*")) if out.parent.is_dir() else []:
        if not _process_alive(leftover.name.rsplit("-", 1)[-1]):
            shutil.rmtree(leftover, ignore_errors=True)
    for previous in sorted(out.parent.glob(f".{out.name}.previous-*")) if out.parent.is_dir() else []:
        if _process_alive(previous.name.rsplit("-", 1)[-1]):
            continue
        if not out.exists():
            os.replace(previous, out)
        else:
            shutil.rmtree(previous, ignore_errors=True)


def _process_alive(pid_text: str) -> bool:
    if not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _swap_in(staging: Path, out: Path) -> None:
    """Replace `out` by `staging`: the old folder moves aside, the new one takes its name, the old
    one is deleted. A kill between the two renames leaves the old index whole under `.NAME.previous-PID`."""
    previous = None
    if out.exists():
        previous = out.parent / f".{out.name}.previous-{os.getpid()}"
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(out, previous)
    os.replace(staging, out)
    _fsync_dir(out.parent)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def read_info(index_dir: str | Path) -> dict:
    """index_info.json, checked to be the kind of file `mmssl index build` writes."""
    path = Path(index_dir) / INFO_FILE
    if not path.is_file():
        raise UserError(f"{index_dir}: not an index folder (no {INFO_FILE}); build one with `mmssl index build`")
    if path.stat().st_size > MAX_INFO_BYTES:
        raise UserError(f"{path} is over {MAX_INFO_BYTES} bytes: not an index_info.json")
    try:
        info = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({getattr(err, 'msg', err)})") from None
    _check_info(info, path)
    return info


def _check_info(info, path: Path) -> None:
    def bad(what: str):
        raise UserError(f"{path}: {what}; rebuild the index with `mmssl index build`")

    if not isinstance(info, dict):
        bad("not a JSON object")
    if info.get("format_version") != FORMAT_VERSION:
        bad(f"format_version {info.get('format_version')!r} is not {FORMAT_VERSION} (made by another mmssl version)")
    for key in ("count", "dim"):
        if isinstance(info.get(key), bool) or not isinstance(info.get(key), int) or info[key] < 1:
            bad(f"{key!r} must be a positive integer")
    if not isinstance(info.get("keys_sha256"), str):
        bad("no keys_sha256")
    modalities = info.get("modalities", ["image"])
    if not (isinstance(modalities, list) and modalities and modalities[0] == "image"
            and len(set(modalities)) == len(modalities) and set(modalities) <= set(MODALITIES)):
        bad(f"'modalities' must list 'image', then optionally 'text', not {str(modalities)[:80]}")
    if not isinstance(info.get("on_disk", False), bool):
        bad("'on_disk' must be true or false")
    files = info.get("files")
    for name in [INDEX_FILES[modality] for modality in modalities] + [METADATA_FILE] + (
            [IVFDATA_FILE] if info.get("on_disk") else []):
        entry = files.get(name) if isinstance(files, dict) else None
        if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)):
            bad(f"no size and sha256 recorded for {name}")
    for where, search in [("search", info.get("search"))] + (
            [("text_index.search", (info.get("text_index") or {}).get("search"))] if "text" in modalities else []):
        search = search or {}
        if not isinstance(search, dict):
            bad(f"{where!r} must be an object")
        param, value = search.get("param"), search.get("value")
        if param is not None and (param not in SEARCH_PARAMS or isinstance(value, bool) or not isinstance(value, int)
                                  or not 1 <= value <= SEARCH_PARAMS[param]):
            bad(f"search knob {param!r}={value!r} is not one mmssl sets")
    if info.get("model") is not None and not isinstance(info["model"], str):
        bad("'model' must be a string or null")


def check_file(folder: Path, name: str, info: dict) -> Path:
    """The path of one of the folder's data files, after checking its size and SHA-256."""
    path = folder / name
    if not path.is_file():
        raise UserError(f"{folder}: no {name}")
    expected = info["files"][name]
    size = path.stat().st_size
    if size != expected["bytes"]:
        raise UserError(f"{path} is {size} bytes but {INFO_FILE} says {expected['bytes']}: "
                        "the file is not the one this index was built with; rebuild the index")
    if file_sha256(path) != expected["sha256"]:
        raise UserError(f"{path}: SHA-256 differs from {INFO_FILE}: the file is not the one this index "
                        "was built with; rebuild the index")
    return path


def load_index_folder(index_dir: str | Path) -> IndexFolder:
    """Index(es), metadata and info, checked to line up; UserError naming the mismatch otherwise."""
    from eval.index.tune import set_search_param

    folder = Path(index_dir)
    try:
        recover_interrupted_build(folder)
    except OSError:  # a read-only place: load what is there
        pass
    info = read_info(folder)
    indexes = {modality: _read_faiss_file(folder, INDEX_FILES[modality], info) for modality in modalities_of(info)}
    metadata = load_metadata(folder, info["count"], info["keys_sha256"])  # the clearest messages first
    check_file(folder, METADATA_FILE, info)
    for modality, index in indexes.items():
        search = (info if modality == "image" else info.get("text_index") or {}).get("search") or {}
        set_search_param(index, search.get("param"), search.get("value"))
    return IndexFolder(indexes["image"], metadata, info, folder, indexes.get("text"))


def _read_faiss_file(folder: Path, name: str, info: dict):
    """One of the folder's FAISS files, checked against index_info.json (size, SHA-256, count, dim)."""
    import faiss

    path = check_file(folder, name, info)
    on_disk = name == INDEX_FILE and info.get("on_disk", False)
    if on_disk:
        check_file(folder, IVFDATA_FILE, info)
    try:
        # SAME_DIR: on-disk lists are only ever looked up beside the .faiss file, never at a path
        # the file names; READ_ONLY: they are mapped read-only
        with quiet_c_stdout():
            index = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as err:
        raise UserError(f"{path}: FAISS cannot read it ({str(err).splitlines()[0]})") from None
    if index.ntotal != info["count"] or index.d != info["dim"]:
        raise UserError(f"{folder}: {name} holds {index.ntotal} {index.d}-d vectors but {INFO_FILE} says "
                        f"{info['count']} {info['dim']}-d; rebuild the index")
    _check_lists(index, folder, path, on_disk)
    return index


def _check_lists(index, folder: Path, path: Path, on_disk: bool) -> None:
    """On-disk lists only where index_info.json says so, in the folder's index.ivfdata, and every
    list inside that file (a list past its end would crash the first search that probes it)."""
    import faiss

    try:
        lists = faiss.extract_index_ivf(index).invlists
    except RuntimeError:   # not an IVF index: no inverted lists
        lists = None
    disk = faiss.downcast_InvertedLists(lists) if lists is not None else None
    is_on_disk = isinstance(disk, faiss.OnDiskInvertedLists)
    if is_on_disk != on_disk:
        raise UserError(f"{path}: its inverted lists are {'on disk' if is_on_disk else 'in memory'} but {INFO_FILE} "
                        f"says {'on disk' if on_disk else 'in memory'}; rebuild the index")
    if not on_disk:
        return
    data = folder / IVFDATA_FILE
    entry = disk.code_size + 8                         # a code and its int64 id
    size = data.stat().st_size
    if Path(disk.filename).name != IVFDATA_FILE or disk.totsize > size or any(
            disk.lists.at(i).size > disk.lists.at(i).capacity
            or disk.lists.at(i).offset + disk.lists.at(i).capacity * entry > disk.totsize
            for i in range(disk.nlist)):
        raise UserError(f"{path}: its inverted lists do not lie inside {data.name} ({size} bytes); rebuild the index")
