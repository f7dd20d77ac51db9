"""Signed digests of a layer's fixed-size chunks (docs/format.md §4, optional annotations).

A layer digest can only be checked once the last byte arrived, so without more a client
must download a whole layer before it may decompress any of it. The publisher therefore
also signs the SHA-256 of each `size`-byte chunk of the blob (the last one may be
shorter): a client verifies each chunk the moment it is complete and decompresses it
then, while later chunks are still arriving. No byte reaches the decoder before a signed
digest vouched for it, and a bad range is caught at its chunk, not at the end.

Pure, apart from `chunk_digests_of`, which reads a file (`ChunkHasher` is fed by the
publisher's compression pass instead).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from exec_sandbox_assets.base.errors import FormatError
from exec_sandbox_assets.release import catalog

# What the publisher writes: 4 MiB keeps the annotation small (64 hex digits per chunk,
# 16 KB for a 1 GB layer) and the first decompressed byte a few ms after the download
# starts. What a client accepts is wider, so another publisher may choose otherwise.
DEFAULT_CHUNK_SIZE = 4 << 20
MIN_CHUNK_SIZE = 64 << 10
MAX_CHUNK_SIZE = 1 << 30
_HEX = 64  # hex digits of one SHA-256
_HEXDIGITS = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class ChunkDigests:
    """The SHA-256 of every `size`-byte chunk of a blob of `total` bytes, in order."""

    size: int
    total: int
    hexes: str  # the digests' lowercase hex, concatenated

    @property
    def count(self) -> int:
        return len(self.hexes) // _HEX

    def span(self, i: int) -> tuple[int, int]:
        """Byte offsets [start, end) of chunk `i`."""
        start = i * self.size
        return start, min(start + self.size, self.total)

    def digest(self, i: int) -> bytes:
        """The raw 32-byte digest chunk `i` must have."""
        return bytes.fromhex(self.hexes[i * _HEX : (i + 1) * _HEX])

    def annotations(self) -> dict[str, str]:
        return {catalog.ANN_CHUNK_SIZE: str(self.size), catalog.ANN_CHUNK_SHA256: self.hexes}


def chunk_count(total: int, size: int) -> int:
    return -(-total // size)


def read_chunks(ann: Mapping[str, str], total: int, where: str) -> ChunkDigests | None:
    """The chunk digests a layer's annotations declare, None when it declares none.

    Both keys or neither: the annotations are signed, so a malformed pair is a broken
    release (refused, as any other malformed annotation), never a reason to skip checks.
    """
    size_text = ann.get(catalog.ANN_CHUNK_SIZE)
    hexes = ann.get(catalog.ANN_CHUNK_SHA256)
    if size_text is None and hexes is None:
        return None
    if size_text is None or hexes is None:
        raise FormatError(
            f"has only one of {catalog.ANN_CHUNK_SIZE} and {catalog.ANN_CHUNK_SHA256}", where
        )
    if not (size_text.isascii() and size_text.isdigit() and len(size_text) <= 10):
        raise FormatError(f"invalid {catalog.ANN_CHUNK_SIZE} {size_text[:20]!r}", where)
    size = int(size_text)
    if not MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE:
        raise FormatError(
            f"{catalog.ANN_CHUNK_SIZE} {size} is outside {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}",
            where,
        )
    count = chunk_count(total, size)
    if len(hexes) != count * _HEX or not _HEXDIGITS.issuperset(hexes):
        raise FormatError(
            f"{catalog.ANN_CHUNK_SHA256} must be {count * _HEX} lowercase hex digits "
            f"({count} chunks of {size} bytes); got {len(hexes)} characters",
            where,
        )
    return ChunkDigests(size, total, hexes)


class ChunkHasher:
    """Chunk digests of bytes fed in pieces of any size: the publisher computes them in
    the pass that writes (or reads) the blob, not by reading it again."""

    def __init__(self, size: int = DEFAULT_CHUNK_SIZE) -> None:
        self.size = size
        self.total = 0
        self._parts: list[str] = []
        self._current = hashlib.sha256()
        self._filled = 0

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        self.total += len(view)
        while view:
            take = min(len(view), self.size - self._filled)
            self._current.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self.size:
                self._parts.append(self._current.hexdigest())
                self._current, self._filled = hashlib.sha256(), 0

    def result(self) -> ChunkDigests:
        parts = self._parts + ([self._current.hexdigest()] if self._filled else [])
        return ChunkDigests(self.size, self.total, "".join(parts))


def chunk_digests_of(path: Path, size: int = DEFAULT_CHUNK_SIZE) -> ChunkDigests:
    """The chunk digests of a file (a blob no pass of the publisher read)."""
    hasher = ChunkHasher(size)
    with path.open("rb") as f:
        while block := f.read(size):
            hasher.update(block)
    return hasher.result()


__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "ChunkDigests",
    "ChunkHasher",
    "chunk_count",
    "chunk_digests_of",
    "read_chunks",
]
