"""Small file-system helpers of the cache: its temp names, exceptions and safe opens.

Stdlib only (the warm path imports this module). Every path the cache opens for its
own files goes through `open_file`: no symlink is followed and no FIFO or device opened
(`fsutil.open_regular`), and what is not a regular file is a `NotRegular`, which the
store treats like a concurrent change and clears.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from exec_sandbox_assets.base.errors import CacheError
from exec_sandbox_assets.base.fsutil import CHUNK, NotRegularFileError, atomic_write, open_regular

TMP_MARK = ".tmp-"
# Records and refs are a few hundred bytes.
MAX_SMALL_FILE = 64 * 1024
# Directories of the cache hold executables (gvproxy): never group- or world-writable,
# whatever the umask (a umask can only take more bits away).
DIR_MODE = 0o755

_T = TypeVar("_T")


class Raced(Exception):
    """A concurrent writer changed a file under us (only possible without working locks)."""


class Stopped(Exception):
    """A worker thread noticed that its caller was cancelled."""


class NotRegular(Raced):
    """A symlink, FIFO, device or directory sits at one of the store's file paths.

    Never followed or opened for I/O: the cache belongs to the user, but a planted link
    must not make the store write elsewhere, and a FIFO must not hang the boot path. A
    `Raced`, so `ensure` starts over after the path was cleared.
    """


def io_error(exc: OSError, action: str, path: Path | str) -> CacheError:
    """The package's error for an OSError on a cache path, naming the path."""
    where = exc.filename if isinstance(exc.filename, str) else str(path)
    reason = exc.strerror or type(exc).__name__
    return CacheError(f"cache: cannot {action} {where}: {reason}")


def open_file(path: Path, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """`fsutil.open_regular` without following symlinks; `NotRegular` for anything odd."""
    try:
        return open_regular(path, flags, mode)
    except NotRegularFileError as exc:
        raise NotRegular(f"{path} is not a regular file") from exc


def read_small(path: Path, cap: int = MAX_SMALL_FILE) -> bytes:
    """A small file's bytes, refusing non-regular files and anything over `cap`."""
    fd = open_file(path)
    try:
        data = os.read(fd, cap + 1)
    finally:
        os.close(fd)
    if len(data) > cap:
        raise ValueError(f"{path} is larger than {cap} bytes")
    return data


def umask() -> int:
    """The process umask, read without changing it (no race with other threads)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"Umask:"):
                return int(line.split()[1], 8)
    old = os.umask(0o022)  # not Linux: the only portable way, briefly
    os.umask(old)
    return old


def file_mode(executable: bool) -> int:
    """0755 / 0644, narrowed by a restrictive umask (never widened)."""
    return (0o755 if executable else 0o644) & ~umask()


def make_dirs(path: Path) -> None:
    """`mkdir -p` with `DIR_MODE`, and no group/world write on the directories made.

    `Path.mkdir(parents=True)` makes the parents with 0777 & ~umask: world-writable under
    umask 000. A directory the cache made earlier that is group/world-writable and ours
    is narrowed: what boots must not be replaceable by other users.
    """
    missing: list[Path] = []
    current = path
    while not current.is_dir():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir(DIR_MODE)
            directory.chmod(DIR_MODE & ~umask())
    with contextlib.suppress(OSError):
        st = path.stat()
        if st.st_mode & 0o022 and st.st_uid == os.geteuid() and stat.S_ISDIR(st.st_mode):
            path.chmod(stat.S_IMODE(st.st_mode) & ~0o022)


def stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    """What changes when a file is replaced or rewritten (memo keys of parsed files)."""
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def temp_owner(path: Path) -> str | None:
    """The output a temp file of the store belongs to (`.NAME.tmp-…`, or a record's
    `.NAME.json.tmp-…` in `.verified/`), or None for any other file."""
    if not path.name.startswith(".") or TMP_MARK not in path.name:
        return None
    name = path.name[1:].split(TMP_MARK, 1)[0]
    if path.parent.name == ".verified":
        name = name.removesuffix(".json")
    return name or None


def tmp_name(directory: Path, name: str) -> Path:
    return directory / f".{name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"


def write_small(path: Path, data: bytes) -> None:
    """Durable replace, with a temp name `gc` recognises (see `TMP_MARK`)."""
    make_dirs(path.parent)
    atomic_write(path, data, tmp=tmp_name(path.parent, path.name), mode=file_mode(False))


def write_all(fd: int, data: bytes | memoryview, offset: int | None = None) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[n:]
        if offset is not None:
            offset += n


def unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def hash_fd(fd: int, hasher: Any, length: int, cancel: threading.Event) -> int:
    """Feed the first `length` bytes of `fd` to `hasher`; returns how many were there."""
    pos = 0
    while pos < length:
        if cancel.is_set():
            raise Stopped
        chunk = os.pread(fd, min(CHUNK, length - pos), pos)
        if not chunk:
            break
        hasher.update(chunk)
        pos += len(chunk)
    return pos


def digest_of(hasher: Any, like: str) -> str:
    return f"{like.partition(':')[0]}:{hasher.hexdigest()}"


async def in_thread(fn: Callable[[threading.Event], _T]) -> _T:
    """Run `fn(cancel)` in a worker thread. If we are cancelled, set `cancel` and wait for
    the thread to stop, so it never outlives the fds and temp files it uses."""
    cancel = threading.Event()
    task = asyncio.ensure_future(asyncio.to_thread(fn, cancel))
    # Retrieve a late exception so asyncio does not log it as unhandled.
    task.add_done_callback(lambda t: None if t.cancelled() else t.exception())
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        cancel.set()
        await asyncio.wait({task})
        raise
