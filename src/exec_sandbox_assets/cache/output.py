"""What an install writes: the output's spec, and the sparse, size-capped, hashed writer.

Zero blocks of the decompressed output are skipped with a seek (holes, as `zstd -d
--sparse` writes them; the file reads back identical and takes less disk). Writeback of
what was written starts every `_WRITEBACK_EVERY` bytes, so the fsync before the rename
waits for little.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exec_sandbox_assets.cache.files import digest_of, write_all
from exec_sandbox_assets.errors import AssetChecksumError, SizeLimitError
from exec_sandbox_assets.fsutil import CHUNK
from exec_sandbox_assets.oci.model import new_hasher

# Zero runs of this size, aligned, become holes (what `zstd -d --sparse` does).
_BLOCK = 4096
_ZERO_BLOCK = bytes(_BLOCK)
_ZERO_CHUNK = bytes(CHUNK)
# Start writeback of the output every this many bytes, so the final fsync has little left.
_WRITEBACK_EVERY = 32 << 20


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


class Output:
    """The output temp file: size-capped, hashed, zero blocks skipped (holes)."""

    def __init__(self, fd: int, out: OutputSpec, path: Path) -> None:
        self.fd, self.out, self.path = fd, out, path
        self.hasher = new_hasher(out.content_digest)
        self.total = 0
        self._flushed = 0
        os.lseek(fd, 0, os.SEEK_SET)

    def write(self, data: bytes) -> None:
        start = self.total
        self.total += len(data)
        # Checked before writing: a bomb costs us at most one chunk.
        if self.total > self.out.content_size:
            raise SizeLimitError(
                f"decompressed {self.out.name} from {self.out.source} exceeds its "
                f"declared size of {self.out.content_size} bytes; stopped"
            )
        self.hasher.update(data)
        view = memoryview(data)
        for lo, hi in _nonzero_runs(data):
            os.lseek(self.fd, start + lo, os.SEEK_SET)
            write_all(self.fd, view[lo:hi])
        if self.total - self._flushed >= _WRITEBACK_EVERY:
            _start_writeback(self.fd, self._flushed, self.total - self._flushed)
            self._flushed = self.total

    def finish(self) -> None:
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
