"""Durable file writes: a temp name beside the target, fsync, rename, fsync the directory.

A crash at any moment leaves the old file or the new one under the final name, never a
torn one. One implementation for the cache, OCI layouts, key files and the publisher.
Stdlib only: the cache imports it on the scheduler's boot path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from exec_sandbox_assets.base.errors import OutOfSpaceError

#: The read/write unit of every streaming copy and hash in the package (blobs, layouts,
#: the publisher): large enough to keep per-call overhead low, small enough for memory.
CHUNK = 1 << 20
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class NotRegularFileError(OSError):
    """A symlink (when not followed), FIFO, device or directory where a file was expected."""


def open_regular(
    path: Path, flags: int = os.O_RDONLY, mode: int = 0o644, *, follow_symlinks: bool = False
) -> int:
    """`os.open` that refuses anything but a regular file, never waiting on a FIFO.

    `follow_symlinks=False` (the cache: a planted link must not redirect a write) refuses
    a symlink at `path` itself; True (OCI layouts, whose blobs are digest-checked wherever
    their bytes live) follows it. Either way a FIFO, device or directory is never opened
    for I/O: a FIFO would block forever, a device never end.
    """
    nofollow = 0 if follow_symlinks else os.O_NOFOLLOW
    try:
        fd = os.open(path, flags | nofollow | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            raise NotRegularFileError(exc.errno, "not a regular file", str(path)) from exc
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFileError(errno.EINVAL, "not a regular file", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some file systems refuse fsync on directories; the rename itself is still atomic.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def temp_beside(dest: Path) -> Path:
    """A fresh hidden name in `dest`'s directory (same file system, so rename is atomic)."""
    return dest.with_name(f".tmp-{secrets.token_hex(6)}-{dest.name}")


def out_of_space(exc: OSError, where: Path, kept: str) -> OutOfSpaceError | None:
    """The OutOfSpaceError for a full disk or quota (saying what was kept), else None."""
    if exc.errno in NO_SPACE_ERRNOS:
        return OutOfSpaceError(f"no space left writing {where} ({exc.strerror}); {kept}")
    return None


@contextlib.contextmanager
def atomic_output(
    dest: Path, *, tmp: Path | None = None, mode: int = 0o644, durable: bool = True
) -> Iterator[BinaryIO]:
    """A file to write `dest` through: renamed onto `dest` after an fsync on a clean exit,
    removed otherwise. `tmp` names the temp file where a caller's cleanup must recognise
    it. A full disk is an OutOfSpaceError, with `dest` unchanged. `durable=False` skips
    the fsyncs (still atomic): for a cache that is verified before it is reused."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp if tmp is not None else temp_beside(dest)
    try:
        # O_EXCL also refuses a symlink planted at the temp name.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except OSError as exc:
        if (full := out_of_space(exc, dest, "nothing was changed")) is not None:
            raise full from exc
        raise
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            if durable:
                os.fsync(out.fileno())
        tmp.replace(dest)
    except OSError as exc:
        if (full := out_of_space(exc, dest, "nothing was changed")) is not None:
            raise full from exc
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # only still there when something failed
    if durable:
        fsync_dir(dest.parent)


def atomic_write(dest: Path, data: bytes, *, tmp: Path | None = None, mode: int = 0o644) -> None:
    """Replace `dest` with `data` durably (see `atomic_output`)."""
    with atomic_output(dest, tmp=tmp, mode=mode) as out:
        out.write(data)
