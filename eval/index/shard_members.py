"""Where each sample's image sits inside its tar shard, so the service can serve it without unpacking.

Why offsets instead of extracted thumbnails: a tar stores each member's bytes contiguously, so
(shard path, byte offset, size) is enough to answer `GET /image/{key}` with one seek and one read,
and the index folder stays small. Keys follow webdataset's rule (the member name up to the first
dot of its last path component). Only local shards can be indexed this way; samples of remote
shards keep their metadata but have no servable image.
"""
from __future__ import annotations

import tarfile
from pathlib import Path

from mmssl.data.tar_reader import split_sample_name

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def shard_members(url: str) -> dict:
    """key -> {"shard", "image_offset", "image_size", "json"} for one local tar (empty if remote)."""
    path = Path(url.removeprefix("file://").removeprefix("file:"))
    if not path.is_file():
        return {}
    found: dict = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            parsed = split_sample_name(member.name) if member.isfile() else None
            if parsed is None:
                continue
            key, extension = parsed
            entry = found.setdefault(key, {"shard": str(path.resolve()), "image_offset": None,
                                           "image_size": None, "json": None})
            if extension in IMAGE_EXTENSIONS and entry["image_offset"] is None:
                entry["image_offset"], entry["image_size"] = member.offset_data, member.size
            elif extension == "json":
                entry["json"] = tar.extractfile(member).read().decode("utf-8", errors="replace")
    return found
