"""What an install writes: the output's spec, and the sparse, size-capped, hashed writer.

Zero blocks of the decompressed output are skipped with a seek (holes, as `zstd -d
--sparse` writes them; the file reads back identical and takes less disk). Writeback of
what was written starts every `_WRITEBACK_EVERY` bytes, so the fsync before the rename
waits for little.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exec_sandbox_assets.base.errors import AssetChecksumError, SizeLimitError
from exec_sandbox_assets.base.fsutil import CHUNK
from exec_sandbox_assets.cache.files import digest_of, write_all
from exec_sandbox_assets.oci.model import new_hasher

if TYPE_CHECKING:
    from exec_sandbox_assets.release.chunks import ChunkDigests

# Zero runs of this size, aligned, become holes (what `zstd -d --sparse` does).
_BLOCK = 4096
_ZERO_BLOCK = bytes(_BLOCK)
_ZERO_CHUNK = bytes(CHUNK)
# Start writeback of the output every this many bytes, so the final fsync has little left.
_WRITEBACK_EVERY = 32 << 20
# Outputs from this size on are hashed and written by a thread of their own.
_THREADED_FROM = 32 << 20
_QUEUE_DEPTH = 8  # chunks of decompressed output in flight between the two threads


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
    # Ids of the trusted keys whose signatures admitted the release; () = unverified.
    verified_by: tuple[str, ...] = ()
    # The layer's signed chunk digests, when its manifest has them (streamed install).
    chunks: ChunkDigests | None = None


class Output:
    """The output temp file: size-capped, hashed, zero blocks skipped (holes).

    For a large output, hashing and writing run in a thread of their own, fed through a
    short queue, so they overlap with the decompression that produces the bytes (on two
    cores a base image then takes the longer of the two, not their sum). The size cap is
    checked by the producer, before a byte is queued.
    """

    def __init__(self, fd: int, out: OutputSpec, path: Path) -> None:
        self.fd, self.out, self.path = fd, out, path
        self.hasher = new_hasher(out.content_digest)
        self.total = 0  # bytes accepted (checked against the cap)
        self._written = 0  # bytes hashed and written
        self._flushed = 0
        self._queue: queue.Queue[bytes | None] | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        os.lseek(fd, 0, os.SEEK_SET)
        if out.content_size >= _THREADED_FROM:
            self._queue = queue.Queue(_QUEUE_DEPTH)
            self._thread = threading.Thread(target=self._drain, name="esa-output", daemon=True)
            self._thread.start()

    def write(self, data: bytes) -> None:
        self.total += len(data)
        # Checked before writing: a bomb costs us at most one chunk.
        if self.total > self.out.content_size:
            raise SizeLimitError(
                f"decompressed {self.out.name} from {self.out.source} exceeds its "
                f"declared size of {self.out.content_size} bytes; stopped"
            )
        if self._queue is None:
            self._sink(data)
            return
        if self._error is not None:
            raise self._error
        self._queue.put(data)

    def _sink(self, data: bytes) -> None:
        start = self._written
        self._written += len(data)
        self.hasher.update(data)
        view = memoryview(data)
        for lo, hi in _nonzero_runs(data):
            os.lseek(self.fd, start + lo, os.SEEK_SET)
            write_all(self.fd, view[lo:hi])
        if self._written - self._flushed >= _WRITEBACK_EVERY:
            _start_writeback(self.fd, self._flushed, self._written - self._flushed)
            self._flushed = self._written

    def _drain(self) -> None:
        assert self._queue is not None
        while (data := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._sink(data)
                except BaseException as exc:  # handed to the producer; keep draining
                    self._error = exc

    def close(self) -> None:
        """Stop the writer thread (idempotent); raises what it failed with, if anything."""
        if self._thread is not None and self._queue is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error

    def finish(self) -> None:
        self.close()
        out = self.out
        actual = digest_of(self.hasher, out.content_digest)
        if actual != out.content_digest:
            raise AssetChecksumError(
                f"decompressed {out.name}", out.content_digest, actual, out.source
            )
        if self.total != out.content_size:
            raise AssetChecksumError(
                f"size of decompressed {out.name}",
                f"{out.content_size} bytes",
                f"{self.total} bytes",
                out.source,
            )
        os.ftruncate(self.fd, self.total)  # a trailing zero run is a hole too


def _nonzero_runs(data: bytes) -> Iterator[tuple[int, int]]:
    """(start, end) of the runs of `data` that are not whole zero blocks."""
    n = len(data)
    if n == CHUNK and data == _ZERO_CHUNK:
        return
    start = -1
    for i in range(0, n, _BLOCK):
        if i + _BLOCK <= n and data.startswith(_ZERO_BLOCK, i):
            if start >= 0:
                yield start, i
                start = -1
        elif start < 0:
            start = i
    if start >= 0:
        yield start, n


@functools.cache
def _sync_file_range() -> Any:
    import ctypes  # the cold path only

    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return fn


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range out now (Linux `sync_file_range`), so the
    fsync before the rename waits for little; a no-op where it does not exist."""
    fn = _sync_file_range()
    if fn is not None:
        fn(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE: start writeback, do not wait


__all__ = ["Output", "OutputSpec"]
