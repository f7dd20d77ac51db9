"""Turn input files into the blobs of a release: zstd-compress raw files, check
pre-compressed ones, and hash both sides (blob and content) in the same pass.

Default level, by measurement (`benchmarks/compress_levels.py`, zstandard 0.25,
2 CPUs, threads=-1; ratio = compressed/original, MB/s of input; noisy ±20%):

    level           1     3     6     9    12    15    19
    qcow2-like 64 MiB (zero runs, ELF, text, random clusters):
      ratio     0.354 0.326 0.311 0.300 0.299 0.297 0.273
      MB/s        619   486   224   130    47    11   4.0
    Go binary (docker-registry, 20 MiB; a gvproxy stand-in):
      ratio     0.338 0.310 0.292 0.286 0.284 0.282 0.257
      MB/s        408   157   101    53    24   6.3   2.7
    decompression stays 330-1250 MB/s at every level (far above any download).

Levels 9-15 buy almost nothing over 6; 19 (btultra2) is the one real step: 9-10%
smaller than 9 and 16-17% smaller than 3. A release is compressed once in CI and
downloaded by every host, so the default is 19 (~4 MB/s per 2 cores: minutes for a
few GB); `--level 3` is there for quick local runs.

Determinism (checked, and relied on for idempotent re-publishing): streaming
compression with the size given up front is byte-identical for any thread count >= 1
and any write size. One-shot `compress()` differs for small inputs (< ~1 MiB), and
threads=0 (single-threaded mode) differs, so neither is ever used.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

import zstandard

from exec_sandbox_assets.base.errors import ConfigError
from exec_sandbox_assets.base.fsutil import CHUNK, atomic_output
from exec_sandbox_assets.release.chunks import ChunkDigests, ChunkHasher

log = logging.getLogger(__name__)

DEFAULT_LEVEL = 19
MIN_LEVEL, MAX_LEVEL = 1, 22
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# Same cap as the client (cache/install.py): frames written with `zstd --long=31` must be readable.
_MAX_WINDOW = 2**31
# Output bytes are a function of level and library version: part of the cache key.
_ZSTD_ID = (
    f"zstandard {zstandard.__version__}, libzstd {'.'.join(map(str, zstandard.ZSTD_VERSION))}"
)


@dataclass(frozen=True)
class Blob:
    """A file ready to push: its blob digest/size and its decompressed digest/size."""

    path: Path
    digest: str
    size: int
    content_digest: str
    content_size: int
    # The blob's chunk digests (release/chunks.py), computed in the same pass.
    chunks: ChunkDigests | None = None


class _BlobHasher:
    """The blob's digest and chunk digests, from the bytes of one pass over it."""

    def __init__(self) -> None:
        self.hasher = hashlib.sha256()
        self.chunks = ChunkHasher()
        self.size = 0

    def update(self, data: bytes) -> None:
        self.hasher.update(data)
        self.chunks.update(data)
        self.size += len(data)

    @property
    def digest(self) -> str:
        return "sha256:" + self.hasher.hexdigest()


class _HashingWriter(_BlobHasher):
    """File sink that hashes what it writes (the compressed side of the one pass), and
    calls `on_write` after each write (zstd hands output over as its threads make it)."""

    def __init__(self, out: BinaryIO, on_write: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.out = out
        self.on_write = on_write

    def write(self, data: bytes) -> int:
        self.update(data)
        self.out.write(data)
        if self.on_write is not None:
            self.on_write()
        return len(data)

    def flush(self) -> None:
        self.out.flush()


def check_level(level: int) -> int:
    if not MIN_LEVEL <= level <= MAX_LEVEL:
        raise ConfigError(f"zstd level {level} out of range {MIN_LEVEL}..{MAX_LEVEL}")
    return level


def hash_file(path: Path) -> tuple[str, int]:
    """sha256 digest and size of a file, read in chunks."""
    hasher = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    return "sha256:" + hasher.hexdigest(), size


def _hash_blob(path: Path) -> _BlobHasher:
    """A blob's digest, size and chunk digests, in one read."""
    hasher = _BlobHasher()
    with path.open("rb") as f:
        while chunk := f.read(4 * CHUNK):
            hasher.update(chunk)
    return hasher


# Called with the number of input bytes compressed since the previous call (the CLI's
# progress): what zstd's threads have compressed, not what was handed to them, which
# runs ahead by up to a few jobs of 32 MiB (level 19).
OnBytes = Callable[[int], None]

# Read and write sizes of `compress_file` (the bytes out do not depend on them): large,
# so the thread feeding zstd's workers takes the GIL a few times per 4 MiB, not dozens,
# while the publishing thread pushes blobs (publish/pipeline.py).
_READ_SIZE = 4 * CHUNK
_WRITE_SIZE = CHUNK


def compress_file(src: Path, dest: Path, level: int, on_bytes: OnBytes | None = None) -> Blob:
    """zstd-compress `src` into `dest` (atomically), hashing both sides in one pass.

    Not durably: the work dir is a cache, and `compress_cached` hashes both files before
    reusing them (a crash costs a recompression, never a wrong blob); the fsyncs stalled
    the compressing thread ~0.13 s a publish of 596 MB."""
    check_level(level)
    content = hashlib.sha256()
    content_size = src.stat().st_size
    cctx = zstandard.ZstdCompressor(
        level=level, threads=-1, write_content_size=True, write_checksum=True
    )
    reported = 0

    def report() -> None:
        nonlocal reported
        consumed = cctx.frame_progression()[1]
        if on_bytes is not None and consumed > reported:
            on_bytes(consumed - reported)
            reported = consumed

    with atomic_output(dest, durable=False) as out, src.open("rb") as f:
        sink = _HashingWriter(out, report if on_bytes is not None else None)
        read = 0
        # size= puts the content size in the frame header (clients preallocate/cap by it).
        with cctx.stream_writer(
            cast(IO[bytes], sink), size=content_size, write_size=_WRITE_SIZE, closefd=False
        ) as z:
            while chunk := f.read(_READ_SIZE):
                content.update(chunk)
                read += len(chunk)
                z.write(chunk)
        if read != content_size:
            raise ConfigError(f"{src} changed size while being compressed")
    if on_bytes is not None and read > reported:
        on_bytes(read - reported)
    return Blob(
        dest, sink.digest, sink.size, "sha256:" + content.hexdigest(), content_size,
        sink.chunks.result(),
    )  # fmt: skip


def inspect_zst(path: Path) -> Blob:
    """Check that `path` is zstd data and read its content digest/size by
    decompressing it in a stream (nothing is written)."""
    with path.open("rb") as f:
        head = f.read(18)
    if not head.startswith(ZSTD_MAGIC):
        raise ConfigError(f"{path}: not a zstd file (no zstd frame magic at the start)")
    try:
        params = zstandard.get_frame_parameters(head)
    except zstandard.ZstdError as exc:
        raise ConfigError(f"{path}: invalid zstd frame header: {exc}") from None
    blob = _BlobHasher()
    content = hashlib.sha256()
    content_size = 0
    dctx = zstandard.ZstdDecompressor(max_window_size=_MAX_WINDOW)
    try:
        with path.open("rb") as raw:

            class _Tee:
                # Hash the compressed bytes as the decompressor pulls them.
                def read(self, n: int = -1) -> bytes:
                    data = raw.read(n)
                    blob.update(data)
                    return data

            with dctx.stream_reader(
                cast(IO[bytes], _Tee()), read_size=CHUNK, read_across_frames=True
            ) as r:
                while chunk := r.read(CHUNK):
                    content.update(chunk)
                    content_size += len(chunk)
    except zstandard.ZstdError as exc:
        raise ConfigError(f"{path}: corrupt zstd data: {exc}") from None
    if blob.size != path.stat().st_size:
        raise ConfigError(f"{path}: trailing data after the last zstd frame")
    if params.content_size not in (zstandard.CONTENTSIZE_UNKNOWN, content_size) and (
        content_size < params.content_size
    ):
        raise ConfigError(
            f"{path}: truncated: the frame declares {params.content_size} bytes, "
            f"{content_size} decompressed"
        )
    return Blob(
        path, blob.digest, blob.size, "sha256:" + content.hexdigest(), content_size,
        blob.chunks.result(),
    )  # fmt: skip


def raw_blob(path: Path) -> Blob:
    """An uncompressed file published as is (gvproxy): blob and content are the same."""
    blob = _hash_blob(path)
    return Blob(path, blob.digest, blob.size, blob.digest, blob.size, blob.chunks.result())


# --------------------------------------------------------------------------- cache


@dataclass(frozen=True)
class _CacheRecord:
    source_digest: str
    source_size: int
    level: int
    zstd_version: str
    digest: str
    size: int


def _sidecar(dest: Path) -> Path:
    return dest.with_name(dest.name + ".json")


def _load_record(dest: Path) -> _CacheRecord | None:
    try:
        data: Any = json.loads(_sidecar(dest).read_bytes())
        return _CacheRecord(**data)
    except (OSError, ValueError, TypeError):
        return None


def compress_cached(src: Path, dest: Path, level: int, on_bytes: OnBytes | None = None) -> Blob:
    """`compress_file`, reusing `dest` from an earlier run when it was made from the
    same source bytes at the same level by the same zstd.

    Re-running a failed publish then costs a hash of each file instead of a level-19
    compression. Both files are re-hashed, so a stale or damaged cache is only slow.
    """
    record = _load_record(dest)
    if record is not None and dest.is_file():
        source_digest, source_size = hash_file(src)
        if (record.source_digest, record.source_size, record.level, record.zstd_version) == (
            source_digest,
            source_size,
            level,
            _ZSTD_ID,
        ) and ((cached := _hash_blob(dest)).digest, cached.size) == (record.digest, record.size):
            log.info(
                "reusing %s (same source, level %d)", dest, level, extra={"digest": record.digest}
            )
            chunks = cached.chunks.result()
            return Blob(dest, record.digest, record.size, source_digest, source_size, chunks)
    _sidecar(dest).unlink(missing_ok=True)
    log.info("compressing %s (zstd level %d)", src, level)
    blob = compress_file(src, dest, level, on_bytes)
    record = _CacheRecord(
        blob.content_digest,
        blob.content_size,
        level,
        _ZSTD_ID,
        blob.digest,
        blob.size,
    )
    with atomic_output(_sidecar(dest), durable=False) as out:
        out.write(json.dumps(asdict(record), sort_keys=True).encode())
    return blob


__all__ = [
    "DEFAULT_LEVEL",
    "Blob",
    "OnBytes",
    "check_level",
    "compress_cached",
    "compress_file",
    "hash_file",
    "inspect_zst",
    "raw_blob",
]
