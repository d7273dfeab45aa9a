"""Which shard URLs may be read, and opening them without a shell.

Shard lists come from data (a downloaded `manifest.json`, a brace pattern in a config), so a URL
is untrusted input. webdataset's opener runs `pipe:` URLs through a shell; mmssl never does.
Local paths (plain, or `file:`) are always readable; remote schemes are read through fsspec only
when the user opted in (`data.allow_remote=true`, `--allow-remote`); every other scheme, `pipe:`
first of all, is refused with one line naming the URL and where it came from.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import BinaryIO

from mmssl.errors import UserError

REMOTE_SCHEMES = ("http", "https", "s3", "gs", "gcs", "az", "abfs", "hf")
_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*):", re.IGNORECASE)


def scheme_of(url: str) -> str | None:
    """The URL's scheme in lower case (`http`, `pipe`, ...), or None for a plain path."""
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else None


def is_remote(url: str) -> bool:
    return scheme_of(url) in REMOTE_SCHEMES


def local_path(url: str) -> Path:
    """The path of a local URL (`file:` prefixes removed)."""
    return Path(url.removeprefix("file://").removeprefix("file:")).expanduser()


def check_url(url: str, allow_remote: bool, where: str) -> None:
    """UserError unless `url` is a local path, or a remote one with `allow_remote`."""
    scheme = scheme_of(url)
    if scheme is None or scheme == "file":
        return
    if scheme == "pipe":
        raise UserError(f"refusing shard {url!r} (from {where}): 'pipe:' URLs run shell commands, "
                        "and mmssl never runs commands named by data")
    if scheme not in REMOTE_SCHEMES:
        raise UserError(f"unsupported shard URL scheme {scheme!r} in {url!r} (from {where}); "
                        f"local paths or {', '.join(REMOTE_SCHEMES)} are read")
    if not allow_remote:
        raise UserError(f"remote shard {url} (from {where}) is not read by default: "
                        "set data.allow_remote=true (or pass --allow-remote) to read remote data")


def open_shard(url: str) -> BinaryIO:
    """A binary stream of one shard: local files directly, remote ones through fsspec.

    `check_url` has decided whether this URL may be read; this only refuses what is never read.
    """
    scheme = scheme_of(url)
    if scheme is None or scheme == "file":
        return open(local_path(url), "rb")
    if scheme not in REMOTE_SCHEMES:
        raise ValueError(f"refusing to open {url!r}: only local paths and {', '.join(REMOTE_SCHEMES)} URLs")
    try:
        import fsspec
    except ImportError:
        raise UserError(f"reading {url} needs fsspec (pip install fsspec)") from None
    try:
        return fsspec.open(url, "rb").open()
    except ImportError as err:  # e.g. http needs aiohttp, s3 needs s3fs
        raise UserError(f"reading {scheme}: URLs needs an extra package: {err}") from None


def read_text(url: str, limit: int, missing_ok: bool = False) -> str | None:
    """A small UTF-8 text file named by data (local, or remote as `open_shard` reads it) of at
    most `limit` bytes, read no further than that; None when it does not exist and `missing_ok`,
    else a one-line UserError. `check_url` has decided whether `url` may be read."""
    try:
        with open_shard(url) as stream:
            data = stream.read(limit + 1)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise UserError(f"not found: {url}") from None
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {url}: {err}") from None
    if len(data) > limit:
        raise UserError(f"{url} is over {limit} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{url} is not UTF-8 text") from None
