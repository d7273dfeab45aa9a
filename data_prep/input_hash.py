"""Content hashes of a prep input, recorded in the manifest and every shard's stats options.

`--resume` compares them, so a table edited between an interrupted run and its resume (same row
count, other captions) is refused instead of mixing old and new rows in one dataset.

Tables and COCO caption files are hashed byte for byte: they are one file, read whole anyway.
An image folder is hashed over the sorted (relative path, size, mtime_ns) of every image and
caption file instead of their bytes: hashing the bytes would read the whole dataset an extra time
before any work (and again at every resume), while an edit, an added or a removed file changes
this listing. Its blind spot is an edit that keeps a file's size and restores its mtime.
Image files named by a table are not hashed, for the same reason.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

_BLOCK = 1 << 20


def file_sha256(path) -> str:
    """sha256 of the file's bytes (hex), read in 1 MiB blocks into one reused buffer (hashing a big
    file leaves no heap behind). The one file hash of prep inputs, index folders and embedding parts."""
    digest = hashlib.sha256()
    buffer = bytearray(_BLOCK)
    view = memoryview(buffer)
    with open(path, "rb") as file:
        while read := file.readinto(buffer):
            digest.update(view[:read])
    return digest.hexdigest()


def listing_sha256(root: Path, relative_paths, extra: dict | None = None) -> str:
    """sha256 over `path\\0size\\0mtime_ns` lines of the files (sorted), then `name\\0value` of `extra`.

    A file that cannot be stat'ed is listed as `path\\0missing`, so it still changes the hash.
    """
    digest = hashlib.sha256()
    for relative in sorted(relative_paths):
        try:
            info = os.stat(root / relative)
            line = f"{relative}\0{info.st_size}\0{info.st_mtime_ns}\n"
        except OSError:
            line = f"{relative}\0missing\n"
        digest.update(line.encode("utf-8", "surrogateescape"))
    for name, value in sorted((extra or {}).items()):
        digest.update(f"{name}\0{value}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()
