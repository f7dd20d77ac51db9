"""Cross-process locks of the cache: advisory, with a timeout, a log line while waiting,
and a fallback where the file system has no working locks.

Correctness never depends on them (DESIGN.md): they only avoid duplicate downloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import time
from pathlib import Path
from types import TracebackType

from exec_sandbox_assets.cache.files import NotRegular, file_mode, make_dirs, open_file

# The store's logger: lock waits are part of what `ensure` reports.
log = logging.getLogger("exec_sandbox_assets.cache.store")

_LOCK_ERRNOS_UNSUPPORTED = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP})


class FileLock:
    """Cross-process exclusive lock on a file (`fcntl.flock`), acquired without blocking
    the event loop.

    Advisory only, by design: after `timeout` seconds, or where the file system does not
    support locking, `acquire` returns False and the caller proceeds unlocked, so callers
    must stay correct without it. The lock file is never deleted (a deleted lock file lets
    two processes each lock a different inode).
    """

    def __init__(
        self,
        path: Path,
        *,
        timeout: float,
        poll_interval: float = 0.05,
        max_poll_interval: float = 0.5,
    ) -> None:
        self.path = path
        self.timeout = timeout
        self._poll = poll_interval
        self._max_poll = max_poll_interval
        self._fd: int | None = None

    @property
    def locked(self) -> bool:
        """Whether this object holds the lock (False after a timeout or fallback)."""
        return self._fd is not None

    async def acquire(self) -> bool:
        """Take the lock; True if held, False if proceeding without it."""
        if self._fd is not None:
            raise RuntimeError(f"lock {self.path} is already held by this object")
        make_dirs(self.path.parent)
        try:
            fd = open_file(self.path, os.O_RDWR | os.O_CREAT, file_mode(False))
        except NotRegular:
            # Never lock (and write the holder note into) a planted link's target.
            log.warning(
                "lock path is not a regular file; proceeding without the lock",
                extra={"lock_path": str(self.path)},
            )
            return False
        deadline = time.monotonic() + self.timeout
        started = time.monotonic()
        delay = self._poll
        waited = False
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pass
                except OSError as exc:
                    if exc.errno not in _LOCK_ERRNOS_UNSUPPORTED:
                        raise
                    log.warning(
                        "file locking unsupported here; proceeding without the lock "
                        "(downloads may be duplicated, results stay verified)",
                        extra={"lock_path": str(self.path), "error": str(exc)},
                    )
                    os.close(fd)
                    return False
                else:
                    self._fd = fd
                    self._note_holder(fd)
                    if waited:
                        log.debug(
                            "acquired lock %s after %.1fs",
                            self.path,
                            time.monotonic() - started,
                            extra={"lock_path": str(self.path)},
                        )
                    return True
                now = time.monotonic()
                if now >= deadline:
                    log.warning(
                        "gave up waiting for lock %s after %.1fs; proceeding without it "
                        "(the work may be duplicated, results stay verified)",
                        self.path,
                        now - started,
                        extra={"lock_path": str(self.path), "holder": _read_holder(fd)},
                    )
                    os.close(fd)
                    return False
                if not waited:
                    waited = True
                    log.info(
                        "waiting for lock %s (held by %s)",
                        self.path,
                        _read_holder(fd) or "another process",
                        extra={"lock_path": str(self.path), "timeout": self.timeout},
                    )
                await asyncio.sleep(min(delay, deadline - now))
                delay = min(delay * 1.5, self._max_poll)
        except BaseException:
            if self._fd is None:
                os.close(fd)
            raise

    async def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    async def __aenter__(self) -> FileLock:
        await self.acquire()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.release()

    @staticmethod
    def _note_holder(fd: int) -> None:
        # Only for the "waiting for ..." message of other processes; best effort.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 64, 0).decode(errors="replace").strip()
    except OSError:
        return ""


__all__ = ["FileLock"]
