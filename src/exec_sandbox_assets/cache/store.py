"""The on-disk cache the scheduler boots from.

Layout under `root`::

    blobs/<algo>/<hex>.partial      resumable download (bytes of the blob from offset 0)
    blobs/<algo>/<hex>              complete, verified blob (transient: removed once installed)
    locks/                          fcntl lock files (never deleted: unlinking races lockers)
    v<version>/<name>               decompressed, verified file the scheduler reads
    v<version>/.verified/<name>.json  record of the verification, with the file's stat
    refs/<key>.json                 small JSON state (floating tags, rollback state)

Rules (DESIGN.md):
- Correctness never depends on a lock. Locks (per output, then per blob) only avoid
  duplicate downloads; they time out, log while waiting and are skipped where the file
  system does not support them. Every writer verifies the full digest of what it is
  about to publish, then publishes with one atomic rename.
- Every write goes to a temp name in the target directory, is fsynced, then renamed, and
  the directory fsynced. A `kill -9` at any moment leaves the old state or the new one,
  plus a `.partial` the next run resumes from.
- The warm path (`lookup`) is a `stat` compared against the record: no hashing. A file
  without a matching record is never trusted; it is reinstalled.
- Threat model: the cache directory belongs to the user. Whoever can write it can change
  what boots (records are not signed), so tampering is out of scope. But the store never
  follows a symlink or opens a FIFO/device at one of its own file paths (`_open_regular`;
  temp files are O_EXCL), so a planted link cannot redirect a write or hang the boot path.

Only the stdlib is imported at module load; `zstandard` is imported when a compressed
output is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import random
import re
import secrets
import stat
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from exec_sandbox_assets.errors import (
    AssetChecksumError,
    AssetDownloadError,
    OutOfSpaceError,
    SizeLimitError,
    TrustError,
)
from exec_sandbox_assets.fsutil import atomic_write, fsync_dir
from exec_sandbox_assets.oci.model import check_digest, digest_hex, new_hasher

log = logging.getLogger(__name__)

BlobOpener = Callable[[int], AbstractAsyncContextManager[AsyncIterator[bytes]]]
"""Given a byte offset, opens a stream of the blob's bytes from that offset."""

CHUNK = 1 << 20
RECORD_FORMAT = 1
# A frame may ask for a window up to 2 GiB (`zstd --long=31`); the blob was verified
# against its signed digest before we decompress it, so honouring the publisher's choice
# is safe, and libzstd's 128 MiB default would refuse such frames outright.
_MAX_WINDOW = 1 << 31
_LOCK_ERRNOS_UNSUPPORTED = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP})
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_TMP_MARK = ".tmp-"
# Without working locks (NFS, ENOLCK) concurrent writers can keep replacing each other's
# partials; a jittered pause desynchronises them, and each retry first checks whether
# another writer has finished.
_MAX_RACE_RETRIES = 8
_RACE_BACKOFF = 0.1
# Records and refs are a few hundred bytes.
_MAX_SMALL_FILE = 64 * 1024

_T = TypeVar("_T")


@dataclass(frozen=True)
class BlobRequest:
    """A blob to download: its digest, its exact size, and where it comes from (for messages)."""

    digest: str
    size: int
    source: str


@dataclass(frozen=True)
class OutputSpec:
    """One file of a release as the scheduler reads it, and the layer it comes from."""

    version: str
    name: str
    layer_digest: str
    layer_size: int
    compressed: bool
    content_digest: str
    content_size: int
    executable: bool
    source: str


@dataclass(frozen=True)
class RecordInfo:
    """What `status` shows for one output of a version."""

    name: str
    path: Path
    size: int
    content_digest: str
    layer_digest: str
    source: str
    verified_at: str
    valid: bool  # the file's stat matches its record (what `lookup` checks)


@dataclass(frozen=True)
class _Record:
    content_digest: str
    size: int
    mtime_ns: int
    ino: int
    layer_digest: str
    source: str
    verified_at: str

    @classmethod
    def from_bytes(cls, data: bytes) -> _Record:
        obj = json.loads(data)
        if not isinstance(obj, dict) or obj.get("format") != RECORD_FORMAT:
            raise ValueError("not a record of a known format")
        return cls(
            content_digest=_field(obj, "content_digest", str),
            size=_field(obj, "size", int),
            mtime_ns=_field(obj, "mtime_ns", int),
            ino=_field(obj, "ino", int),
            layer_digest=_field(obj, "layer_digest", str),
            source=_field(obj, "source", str),
            verified_at=_field(obj, "verified_at", str),
        )

    def matches(self, st: os.stat_result) -> bool:
        return (
            stat.S_ISREG(st.st_mode)
            and st.st_size == self.size
            and st.st_mtime_ns == self.mtime_ns
            and st.st_ino == self.ino
        )


def _field(obj: dict[str, Any], key: str, kind: type[_T]) -> _T:
    value = obj.get(key)
    # `type() is` so that a bool is not taken for an int.
    if type(value) is not kind:
        raise ValueError(f"record field {key!r} must be {kind.__name__}")
    return value


class _Raced(Exception):
    """A concurrent writer changed a file under us (only possible without working locks)."""


class _Stopped(Exception):
    """A worker thread noticed that its caller was cancelled."""


class _NotRegular(_Raced):
    """A symlink, FIFO, device or directory sits at one of the store's file paths.

    Never followed or opened for I/O: the cache belongs to the user, but a planted link
    must not make the store write elsewhere, and a FIFO must not hang the boot path. A
    `_Raced`, so `ensure` starts over after the path was cleared.
    """


def _open_regular(path: Path, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """`os.open` that refuses anything but a regular file (no symlink, no FIFO wait)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            raise _NotRegular(f"{path} is not a regular file") from exc
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _NotRegular(f"{path} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_regular(path: Path, cap: int) -> bytes:
    """A small file's bytes, refusing non-regular files and anything over `cap`."""
    fd = _open_regular(path)
    try:
        data = os.read(fd, cap + 1)
    finally:
        os.close(fd)
    if len(data) > cap:
        raise ValueError(f"{path} is larger than {cap} bytes")
    return data


# -- locks ----------------------------------------------------------------------------------


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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = _open_regular(self.path, os.O_RDWR | os.O_CREAT)
        except _NotRegular:
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


# -- small file-system helpers ---------------------------------------------------------------


def temp_owner(path: Path) -> str | None:
    """The output a temp file of the store belongs to (`.NAME.tmp-…`, or a record's
    `.NAME.json.tmp-…` in `.verified/`), or None for any other file."""
    if not path.name.startswith(".") or _TMP_MARK not in path.name:
        return None
    name = path.name[1:].split(_TMP_MARK, 1)[0]
    if path.parent.name == ".verified":
        name = name.removesuffix(".json")
    return name or None


def _tmp_name(directory: Path, name: str) -> Path:
    return directory / f".{name}{_TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"


def _atomic_write(path: Path, data: bytes) -> None:
    """Durable replace, with a temp name `gc` recognises (see `_TMP_MARK`)."""
    atomic_write(path, data, tmp=_tmp_name(path.parent, path.name))


def _write_all(fd: int, data: bytes | memoryview, offset: int | None = None) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[n:]
        if offset is not None:
            offset += n


def _write_at(fd: int, data: bytes, offset: int, _cancel: threading.Event) -> None:
    _write_all(fd, data, offset)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _hash_fd(fd: int, hasher: Any, length: int, cancel: threading.Event) -> int:
    """Feed the first `length` bytes of `fd` to `hasher`; returns how many were there."""
    pos = 0
    while pos < length:
        if cancel.is_set():
            raise _Stopped
        chunk = os.pread(fd, min(CHUNK, length - pos), pos)
        if not chunk:
            break
        hasher.update(chunk)
        pos += len(chunk)
    return pos


def _digest_of(hasher: Any, like: str) -> str:
    return f"{like.partition(':')[0]}:{hasher.hexdigest()}"


async def _in_thread(fn: Callable[[threading.Event], _T]) -> _T:
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


def _no_space(exc: OSError, what: Path, kept: str) -> OutOfSpaceError:
    return OutOfSpaceError(f"no space left writing {what} ({exc.strerror}); {kept}")


# -- the store -------------------------------------------------------------------------------


class Store:
    """Content-addressed blobs, resumable partials, and verified per-version outputs."""

    def __init__(self, root: Path, *, lock_timeout: float = 1800.0) -> None:
        self.root = Path(root)
        self.lock_timeout = lock_timeout

    # -- paths ----------------------------------------------------------------------------

    def version_dir(self, version: str) -> Path:
        _check_version(version)
        return self.root / f"v{version}"

    def output_path(self, version: str, name: str) -> Path:
        _check_name(name)
        return self.version_dir(version) / name

    def _record_path(self, version: str, name: str) -> Path:
        return self.version_dir(version) / ".verified" / f"{name}.json"

    def _blob_path(self, digest: str) -> Path:
        check_digest(digest)
        return self.root / "blobs" / digest.partition(":")[0] / digest_hex(digest)

    def output_lock(self, version: str, name: str, *, timeout: float | None = None) -> FileLock:
        """The lock `ensure` takes for this output (a `gc` should hold it too)."""
        _check_name(name)
        _check_version(version)
        path = self.root / "locks" / f"out-{version}-{name}.lock"
        return FileLock(path, timeout=self.lock_timeout if timeout is None else timeout)

    def blob_lock(self, digest: str, *, timeout: float | None = None) -> FileLock:
        """The lock held while a blob is downloaded and installed."""
        check_digest(digest)
        algo, _, hexpart = digest.partition(":")
        path = self.root / "locks" / f"blob-{algo}-{hexpart}.lock"
        return FileLock(path, timeout=self.lock_timeout if timeout is None else timeout)

    def partial_size(self, digest: str) -> int:
        """Bytes of `digest` downloaded so far (0 without a partial): where a resume starts."""
        blob = self._blob_path(digest)
        try:
            return blob.with_name(blob.name + ".partial").stat().st_size
        except FileNotFoundError:
            return 0

    # -- warm path ------------------------------------------------------------------------

    def lookup(self, version: str, name: str, *, content_digest: str | None = None) -> Path | None:
        """The verified file, if its stat still matches its record; no hashing.

        With `content_digest`, the record must also name that digest (a cache filled from
        another release under the same version string is not this one).
        """
        try:
            path = self.output_path(version, name)
        except ValueError as exc:
            # A corrupt ref must not crash the boot path: it is just a cache miss.
            log.warning("cache lookup refused", extra={"error": str(exc)})
            return None
        record = self._read_record(version, name)
        if record is None:
            return None
        if content_digest is not None and record.content_digest != content_digest:
            log.debug(
                "cached file has another digest",
                extra={
                    "path": str(path),
                    "recorded": record.content_digest,
                    "wanted": content_digest,
                },
            )
            return None
        try:
            st = path.stat()
        except OSError as exc:
            log.debug("cached file missing", extra={"path": str(path), "error": str(exc)})
            return None
        if not record.matches(st):
            log.debug("cached file changed since it was verified", extra={"path": str(path)})
            return None
        return path

    def _read_record(self, version: str, name: str) -> _Record | None:
        path = self._record_path(version, name)
        try:
            return _Record.from_bytes(_read_regular(path, _MAX_SMALL_FILE))
        except FileNotFoundError:
            log.debug("no verification record", extra={"path": str(path)})
        # ValueError covers JSONDecodeError and UnicodeDecodeError; deep nesting recurses.
        except (OSError, ValueError, RecursionError, _NotRegular) as exc:
            log.debug(
                "unreadable verification record", extra={"path": str(path), "error": str(exc)}
            )
        return None

    # -- cold path ------------------------------------------------------------------------

    async def ensure(
        self,
        out: OutputSpec,
        opener: BlobOpener,
        progress: Callable[[int], None] | None = None,
    ) -> Path:
        """The verified output file, downloading and installing it if needed.

        `progress` receives byte counts as they are obtained: once with the offset a
        download resumes from (or the size of a complete blob found on disk), then per chunk.
        """
        _check_name(out.name)
        _check_version(out.version)
        check_digest(out.layer_digest)
        check_digest(out.content_digest)
        if out.layer_size < 0 or out.content_size < 0:
            raise ValueError(f"negative size in {out}")
        # One deadline for every lock of this call: once we gave up waiting, later locks
        # (the blob lock, or a retry after a race) are tried once, not waited for again.
        deadline = time.monotonic() + self.lock_timeout
        for attempt in range(_MAX_RACE_RETRIES):
            hit = self.lookup(out.version, out.name, content_digest=out.content_digest)
            if hit is not None:
                return hit
            try:
                left = max(0.0, deadline - time.monotonic())
                async with self.output_lock(out.version, out.name, timeout=left) as lock:
                    # Another process may have installed it while we waited.
                    hit = self.lookup(out.version, out.name, content_digest=out.content_digest)
                    if hit is not None:
                        return hit
                    if lock.locked:
                        # Nobody else may be writing this output: temp files are a dead
                        # writer's (a base image's can be GBs).
                        await asyncio.to_thread(self._remove_dead_temps, out)
                    left = max(0.0, deadline - time.monotonic())
                    async with self.blob_lock(out.layer_digest, timeout=left):
                        return await self._fetch_and_install(out, opener, progress)
            except _Raced as exc:
                log.warning(
                    "cache changed under us (concurrent writer without working locks); retrying",
                    extra={
                        "output": out.name,
                        "version": out.version,
                        "attempt": attempt,
                        "error": str(exc),
                    },
                )
                await asyncio.sleep(random.uniform(0, _RACE_BACKOFF * (attempt + 1)))  # noqa: S311
        raise AssetDownloadError(
            f"could not install {out.name} {out.version}: other writers kept changing the cache "
            f"at {self.root} (are file locks working on this file system?)"
        )

    async def _fetch_and_install(
        self, out: OutputSpec, opener: BlobOpener, progress: Callable[[int], None] | None
    ) -> Path:
        started = time.monotonic()
        req = BlobRequest(out.layer_digest, out.layer_size, out.source)
        blob = await self.fetch_blob(req, opener, progress)
        final = self.output_path(out.version, out.name)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            if out.compressed:
                st = await _in_thread(lambda c: _decompress_and_publish(blob, final, out, c))
            else:
                st = await _in_thread(lambda c: _verify_and_publish(blob, final, out, c))
        except TrustError:
            # The signed annotations refuse this blob; keeping it would only waste space.
            await asyncio.to_thread(_unlink, blob)
            raise
        await _in_thread(lambda _c: self._write_record(out, st))
        if out.compressed:
            # Transient: the output is what the scheduler reads. After the record, so a crash
            # in between costs a leftover blob (gc), never a re-download. In a thread:
            # freeing a GB-sized file takes a while on some file systems.
            await asyncio.to_thread(_unlink, blob)
        log.info(
            "installed %s",
            final,
            extra={
                "output": out.name,
                "version": out.version,
                "digest": out.content_digest,
                "source": out.source,
                "seconds": round(time.monotonic() - started, 3),
            },
        )
        return final

    def _remove_dead_temps(self, out: OutputSpec) -> None:
        prefix = f".{out.name}{_TMP_MARK}"
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.version_dir(out.version)):
                if entry.name.startswith(prefix):
                    log.info(
                        "removing temp file of an interrupted install", extra={"path": entry.path}
                    )
                    _unlink(Path(entry.path))

    def _write_record(self, out: OutputSpec, st: os.stat_result) -> None:
        record = {
            "format": RECORD_FORMAT,
            "version": out.version,
            "name": out.name,
            "content_digest": out.content_digest,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "ino": st.st_ino,
            "layer_digest": out.layer_digest,
            "source": out.source,
            "verified_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        data = json.dumps(record, indent=2, sort_keys=True).encode() + b"\n"
        _atomic_write(self._record_path(out.version, out.name), data)

    async def fetch_blob(
        self,
        req: BlobRequest,
        opener: BlobOpener,
        progress: Callable[[int], None] | None = None,
    ) -> Path:
        """Download `req` (resuming a partial) and return the path of the verified blob.

        Callers should hold `blob_lock(req.digest)` to avoid duplicate work; correctness
        does not depend on it.
        """
        blob = self._blob_path(req.digest)
        blob.parent.mkdir(parents=True, exist_ok=True)
        if await self._existing_blob_ok(req, blob):
            if progress is not None:
                progress(req.size)
            return blob
        partial = blob.with_name(blob.name + ".partial")
        # A resumed download that fails its digest is retried once from 0: the old bytes may
        # come from another source or a power loss, so the current source is not to blame yet.
        for fresh in (False, True):
            try:
                return await self._download(req, blob, partial, opener, progress, fresh=fresh)
            except _ResumeFailed as exc:
                log.warning(
                    "resumed download failed its digest check; restarting from 0",
                    extra={"digest": req.digest, "source": req.source, "resumed_from": exc.offset},
                )
        raise AssertionError("unreachable: a fresh download never raises _ResumeFailed")

    async def _existing_blob_ok(self, req: BlobRequest, blob: Path) -> bool:
        """A complete blob left by a crash before its install: reuse it only if it verifies."""
        try:
            fd = _open_regular(blob)
        except FileNotFoundError:
            return False
        except _NotRegular:
            log.warning("discarding non-regular file at a blob path", extra={"path": str(blob)})
            _unlink(blob)
            return False
        try:
            hasher = new_hasher(req.digest)
            size = os.fstat(fd).st_size
            if size == req.size:
                await _in_thread(lambda cancel: _hash_fd(fd, hasher, size, cancel))
        finally:
            os.close(fd)
        if size == req.size and _digest_of(hasher, req.digest) == req.digest:
            log.info("reusing verified blob", extra={"digest": req.digest, "path": str(blob)})
            return True
        log.warning("discarding corrupt blob", extra={"digest": req.digest, "path": str(blob)})
        _unlink(blob)
        return False

    async def _download(
        self,
        req: BlobRequest,
        blob: Path,
        partial: Path,
        opener: BlobOpener,
        progress: Callable[[int], None] | None,
        *,
        fresh: bool,
    ) -> Path:
        if fresh:
            _unlink(partial)
        # No O_APPEND: we write at explicit offsets, so two writers of the same blob (only
        # possible when locks do not work) put identical bytes at identical places instead
        # of appending twice.
        try:
            fd = _open_regular(partial, os.O_RDWR | os.O_CREAT)
        except _NotRegular:
            log.warning(
                "discarding non-regular file at a partial path", extra={"path": str(partial)}
            )
            _unlink(partial)  # removes the link itself, never its target
            raise
        try:
            st = os.fstat(fd)
            hasher = new_hasher(req.digest)
            offset = st.st_size
            if offset > req.size:
                log.warning(
                    "partial larger than its blob; restarting",
                    extra={"digest": req.digest, "partial_size": offset, "size": req.size},
                )
                os.ftruncate(fd, 0)
                offset = 0
            if offset:
                offset = await _in_thread(lambda cancel: _hash_fd(fd, hasher, offset, cancel))
                log.info(
                    "resuming download at %d of %d bytes",
                    offset,
                    req.size,
                    extra={"digest": req.digest, "source": req.source},
                )
                if progress is not None:
                    progress(offset)
            resumed_from = offset
            if offset < req.size:
                offset = await self._stream(req, partial, fd, offset, hasher, opener, progress)
            actual = _digest_of(hasher, req.digest)
            if actual != req.digest:
                _unlink(partial)
                if resumed_from:
                    raise _ResumeFailed(resumed_from)
                raise AssetChecksumError(f"blob {req.digest}", req.digest, actual, req.source)
            await _in_thread(lambda _cancel: _publish_partial(fd, partial, blob))
        finally:
            os.close(fd)
        return blob

    async def _stream(
        self,
        req: BlobRequest,
        partial: Path,
        fd: int,
        offset: int,
        hasher: Any,
        opener: BlobOpener,
        progress: Callable[[int], None] | None,
    ) -> int:
        pos = offset
        async with opener(offset) as stream:
            async for chunk in stream:
                if not chunk:
                    continue
                if pos + len(chunk) > req.size:
                    # This source lies about the blob: drop what it sent, keep what earlier
                    # attempts fetched (the final digest check still covers all of it).
                    if offset:
                        os.ftruncate(fd, offset)
                    else:
                        _unlink(partial)
                    raise SizeLimitError(
                        f"{req.source} sent more than the {req.size} bytes of blob {req.digest}"
                    )
                hasher.update(chunk)
                try:
                    # In a thread: write() stalls for tens of ms under writeback pressure,
                    # which starves the loop when downloads run in parallel (measured, 3 x
                    # 256 MiB: 0.35 -> 0.53 GB/s, max loop lag 32 -> 8 ms; one download:
                    # no difference). Hashing 1 MiB on the loop costs ~1 ms.
                    await _in_thread(functools.partial(_write_at, fd, chunk, pos))
                except OSError as exc:
                    if exc.errno in _NO_SPACE_ERRNOS:
                        raise _no_space(exc, partial, "partial kept for resume") from exc
                    raise
                pos += len(chunk)
                if progress is not None:
                    progress(len(chunk))
        if pos < req.size:
            raise AssetDownloadError(
                f"truncated download of blob {req.digest} from {req.source}: "
                f"got {pos} of {req.size} bytes (partial kept for resume)"
            )
        return pos

    # -- refs -----------------------------------------------------------------------------

    def _state_path(self, key: str) -> Path:
        if (
            not key
            or key.startswith(".")
            or len(key.encode()) > 200
            or any(c in key for c in "/\\")
            or any(ord(c) < 32 or ord(c) == 127 for c in key)
        ):
            raise ValueError(f"invalid state key {key!r}: must be a plain file name")
        return self.root / "refs" / f"{key}.json"

    def read_state(self, key: str) -> dict[str, Any] | None:
        path = self._state_path(key)
        try:
            data = _read_regular(path, _MAX_SMALL_FILE)
        except FileNotFoundError:
            return None
        except (_NotRegular, ValueError) as exc:
            log.warning(
                "ignoring unreadable state file", extra={"path": str(path), "error": str(exc)}
            )
            return None
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError) as exc:
            log.warning("ignoring corrupt state file", extra={"path": str(path), "error": str(exc)})
            return None
        if not isinstance(obj, dict):
            log.warning("ignoring state file that is not an object", extra={"path": str(path)})
            return None
        return obj

    def write_state(self, key: str, data: dict[str, Any]) -> None:
        path = self._state_path(key)
        _atomic_write(path, json.dumps(data, indent=2, sort_keys=True).encode() + b"\n")

    # -- introspection (status / gc) ------------------------------------------------------

    def versions(self) -> list[str]:
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        found = [
            e.name[1:]
            for e in entries
            if e.name.startswith("v") and _VERSION_RE.fullmatch(e.name[1:]) and e.is_dir()
        ]
        return sorted(found, key=_version_key)

    def outputs(self, version: str) -> list[RecordInfo]:
        """Every output of `version`: files with or without a record, records without a file."""
        vdir = self.version_dir(version)
        names: set[str] = set()
        with contextlib.suppress(FileNotFoundError):
            names.update(
                e.name for e in os.scandir(vdir) if not e.name.startswith(".") and e.is_file()
            )
        with contextlib.suppress(FileNotFoundError):
            names.update(
                e.name.removesuffix(".json")
                for e in os.scandir(vdir / ".verified")
                if e.name.endswith(".json") and not e.name.startswith(".")
            )
        infos = []
        for name in sorted(names):
            path = vdir / name
            record = self._read_record(version, name)
            valid = self.lookup(version, name) is not None
            if record is None:
                try:
                    size = path.stat().st_size
                except OSError:
                    size = 0
                infos.append(RecordInfo(name, path, size, "", "", "", "", False))
            else:
                infos.append(
                    RecordInfo(
                        name,
                        path,
                        record.size,
                        record.content_digest,
                        record.layer_digest,
                        record.source,
                        record.verified_at,
                        valid,
                    )
                )
        return infos

    def partials(self) -> list[tuple[Path, int]]:
        """Resumable downloads and their sizes."""
        return [
            (p, size)
            for p, size in self._blob_files()
            if p.name.endswith(".partial") and _TMP_MARK not in p.name
        ]

    def blobs(self) -> list[tuple[Path, int]]:
        """Complete blobs left by a crash between download and install (reused, or gc'd)."""
        return [(p, size) for p, size in self._blob_files() if "." not in p.name]

    def stray_temp_files(self) -> list[Path]:
        """Temp files of interrupted writes, and partial downloads.

        A running writer has some too: delete them only while holding the matching lock,
        or when they are old.
        """
        found: list[Path] = []
        dirs = [self.root / "refs"]
        for version in self.versions():
            vdir = self.version_dir(version)
            dirs += [vdir, vdir / ".verified"]
        for d in dirs:
            with contextlib.suppress(FileNotFoundError):
                found += [
                    Path(e.path)
                    for e in os.scandir(d)
                    if e.name.startswith(".") and _TMP_MARK in e.name
                ]
        found += [p for p, _ in self._blob_files() if p.name.endswith(".partial")]
        return sorted(found)

    def verify_full(self, version: str) -> list[tuple[str, bool]]:
        """Re-hash every output of `version` against its record's content digest (slow; for
        `status --full`). A file without a record, or missing, is reported False."""
        results = []
        for info in self.outputs(version):
            ok = False
            if info.content_digest:
                try:
                    ok = _file_digest(info.path, info.content_digest) == info.content_digest
                except OSError:
                    ok = False
            results.append((info.name, ok))
        return results

    def _blob_files(self) -> Iterator[tuple[Path, int]]:
        blobs = self.root / "blobs"
        try:
            algos = [e for e in os.scandir(blobs) if e.is_dir()]
        except FileNotFoundError:
            return
        for algo in algos:
            for e in os.scandir(algo.path):
                with contextlib.suppress(FileNotFoundError):
                    if e.is_file():
                        yield Path(e.path), e.stat().st_size


def _publish_partial(fd: int, partial: Path, blob: Path) -> None:
    # No fsync: a blob is transient and re-hashed before any later use, so one torn by a
    # power loss is caught, never trusted; the output it decompresses to is fsynced.
    # (Saves writing every compressed byte synchronously: measured with benchmarks/pull.py.)
    # Publish only the inode we verified; if it was swapped, let `ensure` start over.
    try:
        same = os.path.samestat(partial.stat(), os.fstat(fd))
    except FileNotFoundError:
        same = False
    if not same:
        raise _Raced(f"{partial} was replaced or removed while we wrote it")
    partial.replace(blob)


class _ResumeFailed(Exception):
    def __init__(self, offset: int) -> None:
        super().__init__(f"resumed at {offset}")
        self.offset = offset


# -- install (run in worker threads) ---------------------------------------------------------


def _decompress_and_publish(
    blob: Path, final: Path, out: OutputSpec, cancel: threading.Event
) -> os.stat_result:
    """Decompress the verified blob into a temp file, check size and digest, publish it."""
    import zstandard  # only the cold path pays for it

    dctx = zstandard.ZstdDecompressor(max_window_size=_MAX_WINDOW)
    try:
        src = os.fdopen(_open_regular(blob), "rb")
    except FileNotFoundError as exc:
        raise _Raced(f"{blob} vanished before its install") from exc
    tmp = _tmp_name(final.parent, final.name)
    with src:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            hasher = new_hasher(out.content_digest)
            total = 0
            try:
                with dctx.stream_reader(src, read_size=CHUNK, read_across_frames=True) as reader:
                    while chunk := reader.read(CHUNK):
                        if cancel.is_set():
                            raise _Stopped
                        total += len(chunk)
                        # Checked before writing: a bomb costs us at most one chunk.
                        if total > out.content_size:
                            raise SizeLimitError(
                                f"decompressed {out.name} from {out.source} exceeds its "
                                f"declared size of {out.content_size} bytes; stopped"
                            )
                        hasher.update(chunk)
                        _write_all(fd, chunk)
            except zstandard.ZstdError as exc:
                raise AssetChecksumError(
                    f"decompressed {out.name}",
                    out.content_digest,
                    f"undecodable zstd data ({exc})",
                    out.source,
                ) from None
            except OSError as exc:
                if exc.errno in _NO_SPACE_ERRNOS:
                    raise _no_space(exc, tmp, "the verified blob is kept") from exc
                raise
            actual = _digest_of(hasher, out.content_digest)
            if actual != out.content_digest:
                raise AssetChecksumError(
                    f"decompressed {out.name}", out.content_digest, actual, out.source
                )
            if total != out.content_size:
                raise AssetChecksumError(
                    f"size of decompressed {out.name}",
                    f"{out.content_size} bytes",
                    f"{total} bytes",
                    out.source,
                )
            os.fchmod(fd, 0o755 if out.executable else 0o644)
            os.fsync(fd)
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            _unlink(tmp)
            raise
        os.close(fd)
    try:
        tmp.replace(final)
    except FileNotFoundError as exc:
        raise _Raced(f"{tmp} was removed before its rename") from exc
    except BaseException:
        _unlink(tmp)
        raise
    fsync_dir(final.parent)
    return st


def _verify_and_publish(
    blob: Path, final: Path, out: OutputSpec, cancel: threading.Event
) -> os.stat_result:
    """An uncompressed blob is the content: check the bytes on disk, then rename it into place.

    The blob was verified while streaming; hashing it again here makes what becomes visible
    independent of any lock (the only uncompressed output, gvproxy, is small).
    """
    try:
        fd = _open_regular(blob)
    except FileNotFoundError as exc:
        raise _Raced(f"{blob} vanished before its install") from exc
    try:
        st = os.fstat(fd)
        if st.st_size != out.content_size:
            raise SizeLimitError(
                f"{out.name} from {out.source} is {st.st_size} bytes, "
                f"declared content size is {out.content_size}"
            )
        hasher = new_hasher(out.content_digest)
        _hash_fd(fd, hasher, st.st_size, cancel)
        actual = _digest_of(hasher, out.content_digest)
        if actual != out.content_digest:
            raise AssetChecksumError(out.name, out.content_digest, actual, out.source)
        os.fchmod(fd, 0o755 if out.executable else 0o644)
        os.fsync(fd)
        st = os.fstat(fd)
        try:
            blob.replace(final)
        except FileNotFoundError as exc:
            raise _Raced(f"{blob} vanished during its install") from exc
    finally:
        os.close(fd)
    fsync_dir(final.parent)
    return st


def _file_digest(path: Path, like: str) -> str:
    hasher = new_hasher(like)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
    return _digest_of(hasher, like)


# -- validation -------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    # The caller validated it against SPEC section 1; this guards the file system anyway.
    # 100: lock and temp names add the version (<= 128) and ~20 more to a 255-byte limit.
    if not name or "/" in name or "\0" in name or name.startswith(".") or len(name) > 100:
        raise ValueError(f"invalid output name {name!r}")


def _check_version(version: str) -> None:
    if not _VERSION_RE.fullmatch(version):
        raise ValueError(f"invalid version {version!r}")


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"[.+-]", version)
    )


__all__ = [
    "BlobOpener",
    "BlobRequest",
    "FileLock",
    "OutputSpec",
    "RecordInfo",
    "Store",
]
