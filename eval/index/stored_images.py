"""Serving an index's stored images, and nothing else: only from the roots recorded at build time.

An index folder is untrusted input (anyone can hand one over, or edit its metadata.parquet), and
its rows name files: a tar shard plus an offset, or an image path. So:

- `index_info.json` records `image_roots` at build time: the resolved folders of the shards for
  a `--data` build, the `--image-root` folders (default: the metadata parquet's folder) for an
  `--embeddings` build. A root that is a system folder ("/", "/etc", ...) is refused.
- When the index loads, a row whose shard (after resolving symlinks) or image path (absolute,
  normalised) lies outside every root is refused: UserError naming the row. An index that records
  no roots (built before they were recorded) serves no images.
- When serving, the file's real path is checked again (a symlink inside a root may point out of
  it), a shard slice must sit right after a tar header that names `{key}.<image extension>` with
  the same size, and the bytes must start with a JPEG, PNG, WebP or GIF signature. Anything else
  is answered as "no servable image" (404).
"""
from __future__ import annotations

import os
import tarfile
from pathlib import Path

from eval.index.shard_members import IMAGE_EXTENSIONS
from mmssl.data.tar_reader import split_sample_name
from mmssl.errors import UserError

MAX_IMAGE_BYTES = 32 * 2**20
TAR_BLOCK = 512
SYSTEM_FOLDERS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/root", "/run", "/sbin",
                  "/sys", "/usr", "/var/lib", "/var/log", "/var/run")


def image_media_type(data: bytes) -> str | None:
    """The media type of JPEG, PNG, WebP or GIF bytes (from their signature); None for anything else."""
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return None


def checked_roots(roots) -> list[str]:
    """Resolved, existing-or-not absolute root folders; UserError for a relative or system folder."""
    if not isinstance(roots, list):
        raise UserError(f"image_roots must be a list of folders, not {type(roots).__name__}")
    resolved = []
    for root in roots:
        if not isinstance(root, str) or not os.path.isabs(root):
            raise UserError(f"image root {root!r} is not an absolute path")
        real = os.path.realpath(root)
        if real == "/" or any(real == folder or real.startswith(folder + "/") for folder in SYSTEM_FOLDERS):
            raise UserError(f"image root {root!r} is a system folder: refusing to serve files from it")
        resolved.append(real)
    return sorted(set(resolved))


def inside(path: str, roots: list[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def first_row_outside(shards, paths, roots: list[str]) -> tuple[int, str] | None:
    """(row, what it names) of the first row whose shard (resolved; each distinct shard once) or
    image path (absolute and normalised, else it counts as outside) is not under a root."""
    if shards is not None:
        first_row: dict = {}
        for i, shard in enumerate(shards):
            if shard and shard not in first_row:
                first_row[shard] = i
        for shard, i in first_row.items():
            if not inside(os.path.realpath(shard), roots):
                return i, f"shard {shard}"
    if paths is not None:
        for i, path in enumerate(paths):
            if path and not (os.path.isabs(path) and inside(os.path.normpath(path), roots)):
                return i, f"image_path {path}"
    return None


class StoredImages:
    """`has(i)` / `read(i)` for the images of an index's metadata rows, confined to `roots`."""

    def __init__(self, metadata, roots: list[str] | None):
        self.metadata = metadata
        self.roots = checked_roots(roots) if roots is not None else []
        self.enabled = roots is not None
        columns = metadata.columns
        self._shards = columns.get("shard")
        self._offsets = columns.get("image_offset")
        self._sizes = columns.get("image_size")
        self._paths = columns.get("image_path")
        if self.enabled:
            self._check_rows()

    @classmethod
    def for_folder(cls, folder) -> "StoredImages":
        return cls(folder.metadata, folder.info.get("image_roots"))

    def _check_rows(self) -> None:
        """UserError for the first row whose image location lies outside every root."""
        outside = first_row_outside(self._shards if self._offsets is not None else None, self._paths, self.roots)
        if outside is not None:
            i, what = outside
            raise UserError(f"metadata row {i} (key {self.metadata.keys[i]!r}) names {what}, outside the image "
                            f"roots recorded at build time ({', '.join(self.roots) or 'none'}); "
                            "refusing to serve this index")

    def has(self, i: int) -> bool:
        """Whether row i names a local image (the file itself is checked when read)."""
        if not self.enabled:
            return False
        if self._shards is not None and self._shards[i] and self._offsets is not None \
                and self._offsets[i] is not None:
            return True
        return self._paths is not None and bool(self._paths[i])

    def read(self, i: int) -> tuple[bytes, str] | None:
        """(bytes, media type) of row i's image, or None when there is no servable image."""
        if not self.has(i):
            return None
        try:
            if self._shards is not None and self._shards[i] and self._offsets[i] is not None:
                data = self._read_tar_slice(i)
            else:
                data = self._read_file(self._paths[i])
        except OSError:
            return None
        media_type = image_media_type(data) if data else None
        return (data, media_type) if media_type else None

    def _open_inside(self, path: str):
        real = os.path.realpath(path)
        if not inside(real, self.roots):
            return None
        return open(real, "rb")

    def _read_file(self, path: str) -> bytes | None:
        file = self._open_inside(path)
        if file is None:
            return None
        with file:
            if os.fstat(file.fileno()).st_size > MAX_IMAGE_BYTES:
                return None
            return file.read(MAX_IMAGE_BYTES)

    def _read_tar_slice(self, i: int) -> bytes | None:
        offset, size = self._offsets[i], self._sizes[i] if self._sizes is not None else None
        if size is None or offset < TAR_BLOCK or offset % TAR_BLOCK or not 0 < size <= MAX_IMAGE_BYTES:
            return None
        file = self._open_inside(self._shards[i])
        if file is None:
            return None
        with file:
            if offset + size > os.fstat(file.fileno()).st_size:
                return None
            file.seek(offset - TAR_BLOCK)
            if not self._header_names(file.read(TAR_BLOCK), self.metadata.keys[i], size):
                return None
            return file.read(size)

    @staticmethod
    def _header_names(block: bytes, key: str, size: int) -> bool:
        """Whether a tar header block describes the regular file `{key}.<image ext>` of `size` bytes."""
        try:
            member = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.TarError:
            return False
        parsed = split_sample_name(member.name)
        return (member.isfile() and member.size == size and parsed is not None
                and parsed[0] == key and parsed[1] in IMAGE_EXTENSIONS)


def image_roots_of_shards(shard_paths) -> list[str]:
    """The resolved folders holding these shard files (what a `--data` build records)."""
    return sorted({str(Path(os.path.realpath(path)).parent) for path in shard_paths if path})
