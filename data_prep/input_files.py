"""Reading one row's input file (an image, a caption): regular files only, bounded, never blocking.

Rows name paths that come from anyone. A FIFO would block `open()` forever and a device such as
/dev/zero never ends, so the file is opened without blocking and anything that is not a regular
file is refused before a byte is read; a `max_bytes` bound stops a huge file early. A path a row
names must also stay inside the folder the user gave for it (`inside_root`): a downloaded table
cannot copy `/home/you/private.jpg` into a dataset, with `..`, an absolute path or a symlink.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from data_prep.samples import SampleFailure


class NotRegularFile(OSError):
    """The path is a FIFO, a device or a socket."""


class FileTooLarge(OSError):
    """The file holds more than the caller's `max_bytes`."""


def inside_root(root: Path, name: str, flag: str) -> Path:
    """`root / name` (an absolute `name` stands alone), or SampleFailure unless it resolves,
    symlinks followed, inside the resolved `root`; `flag` names the option that set the root."""
    path = root / name
    if not path.resolve().is_relative_to(root.resolve()):
        raise SampleFailure(f"outside {flag} {root}: {name}")
    return path


def read_regular_file(path, max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file at `path`; OSError (or a subclass above) when it is not one.

    A folder raises IsADirectoryError, as reading it would.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with open(fd, "rb") as file:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):
            raise NotRegularFile(errno.EINVAL, "not a regular file", str(path))
        if max_bytes is None:
            return file.read()
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FileTooLarge(errno.EFBIG, f"more than {max_bytes} bytes", str(path))
    return data
