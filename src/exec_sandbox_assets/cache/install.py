"""Download, verify and publish one blob or output, as one pipeline.

While `download.fill` writes the blob into its `.partial`, one worker thread reads the
partial in order as it fills (`_Reader`) and hashes the layer, so the layer digest is
known the moment the last byte lands. No unverified byte reaches the decoder
(docs/format.md §4): a layer with signed chunk digests (`_ChunkedReader`) is decompressed
chunk by chunk, each as soon as its digest matched, while the download goes on; any
other compressed layer once its whole digest matched, from the partial still in the page
cache. The output is hashed, size-capped and written to a temp file with zero runs as
holes (`output.Output`, by a thread of its own for large files).

What the format asks holds: nothing reaches its final name before the layer digest and
the content digest both match (the rename is the last step, after an fsync), and the
output can never exceed its signed size (checked before each write).

A partial survives every failure but a trust failure, so the next call resumes; it is
re-read from 0 (local I/O) and only the missing bytes are downloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar, cast

from exec_sandbox_assets.base.errors import (
    AssetChecksumError,
    OutOfSpaceError,
    SizeLimitError,
    TrustError,
)
from exec_sandbox_assets.base.fsutil import CHUNK, fsync_dir, out_of_space
from exec_sandbox_assets.cache.download import (
    BlobOpener,
    BlobRequest,
    Filling,
    OverSentError,
    fill,
    plan,
    ranges_path,
)
from exec_sandbox_assets.cache.files import (
    NotRegular,
    Raced,
    Stopped,
    digest_of,
    file_mode,
    make_dirs,
    open_file,
    tmp_name,
    unlink,
)
from exec_sandbox_assets.cache.gate import Gate, GateClosed
from exec_sandbox_assets.cache.output import Output, OutputSpec
from exec_sandbox_assets.oci.model import new_hasher

if TYPE_CHECKING:
    from exec_sandbox_assets.release.chunks import ChunkDigests

log = logging.getLogger("exec_sandbox_assets.cache.store")

_T = TypeVar("_T")

# A frame may ask for a window up to 2 GiB (`zstd --long=31`); once the blob is verified
# against its signed digest, honouring the publisher's choice is safe.
_MAX_WINDOW = 1 << 31


class ResumeFailed(Exception):
    def __init__(self, offset: int) -> None:
        super().__init__(f"resumed at {offset}")
        self.offset = offset


class _Aborted(Exception):
    """The download failed; the reader stops (the download's error is what is raised)."""


class _LayerMismatch(Exception):
    def __init__(self, actual: str, what: str = "", expected: str = "") -> None:
        self.actual, self.what, self.expected = actual, what, expected


class _KeptBlob(Exception):
    """The disk filled while writing the output; the verified blob is worth keeping."""

    def __init__(self, error: OSError, tmp: Path) -> None:
        self.error, self.tmp = error, tmp


async def obtain(
    blob: Path,
    req: BlobRequest,
    opener: BlobOpener,
    progress: Callable[[int], None] | None,
    *,
    final: Path | None = None,
    out: OutputSpec | None = None,
    resumes: int,
    gate: Gate | None = None,
) -> os.stat_result:
    """Download (resuming) and verify `req`; install it as `final` for `out`, or keep the
    verified blob at `blob` without `out`. Returns the stat of what was published.

    With a `gate`, the download starts at once but the partial is read (hashed,
    decompressed, installed) only once the gate opened: the release's signature verified.

    A resumed download that fails its digest is retried once from 0: the old bytes may
    come from another source or a power loss, so the current source is not to blame yet.
    """
    for fresh in (False, True):
        try:
            return await _attempt(blob, req, opener, progress, final, out, resumes, fresh, gate)
        except ResumeFailed as exc:
            log.warning(
                "resumed download failed its digest check; restarting from 0",
                extra={"digest": req.digest, "source": req.source, "resumed_from": exc.offset},
            )
    raise AssertionError("unreachable: a fresh download never raises ResumeFailed")


async def _attempt(
    blob: Path,
    req: BlobRequest,
    opener: BlobOpener,
    progress: Callable[[int], None] | None,
    final: Path | None,
    out: OutputSpec | None,
    resumes: int,
    fresh: bool,
    gate: Gate | None,
) -> os.stat_result:
    partial = blob.with_name(blob.name + ".partial")
    if fresh:
        unlink(partial)
        unlink(ranges_path(partial))
    _adopt_complete_blob(blob, partial)
    # No O_APPEND: we write at explicit offsets, so two writers of the same blob (only
    # possible when locks do not work) put identical bytes at identical places.
    try:
        fd = open_file(partial, os.O_RDWR | os.O_CREAT, 0o600)
    except NotRegular:
        log.warning("discarding non-regular file at a partial path", extra={"path": str(partial)})
        unlink(partial)  # removes the link itself, never its target
        raise
    try:
        filling = plan(fd, req.size, partial, ranged=True)
        resumed_from = filling.have
        if resumed_from:
            log.info(
                "resuming download at %d of %d bytes",
                filling.have,
                req.size,
                extra={"digest": req.digest, "source": req.source},
            )
        tmp = tmp_name(final.parent, final.name) if final and out and out.compressed else None
        try:
            result = await _pipeline(
                filling, req, opener, progress, partial, out, tmp, resumes, gate
            )
        except GateClosed as exc:
            if isinstance(exc.error, TrustError):
                _drop(partial)  # bytes a refused release named: not worth keeping
            raise exc.error from None
        except _LayerMismatch as exc:
            _drop(partial)
            if resumed_from:
                raise ResumeFailed(resumed_from) from None
            raise AssetChecksumError(
                exc.what or f"blob {req.digest}", exc.expected or req.digest, exc.actual, req.source
            ) from None
        except _KeptBlob as exc:
            _publish(fd, partial, blob)
            unlink(ranges_path(partial))
            raise out_of_space(exc.error, exc.tmp, "the verified blob is kept") or OutOfSpaceError(
                str(exc.error)
            ) from exc.error
        except TrustError as exc:
            if not isinstance(exc, OverSentError):
                # The signed annotations refuse this blob; keeping it would only waste space.
                _drop(partial)
            raise
        if tmp is not None and final is not None:
            try:
                tmp.replace(final)
            except FileNotFoundError as exc:
                raise Raced(f"{tmp} was removed before its rename") from exc
            except BaseException:
                unlink(tmp)
                raise
            fsync_dir(final.parent)
            # The output is what the scheduler reads; the partial goes (it holds the
            # verified blob, but keeping it would double the space of every release).
            _drop(partial)
        else:
            if final is not None:
                make_dirs(final.parent)
            _publish(fd, partial, final or blob)
            unlink(ranges_path(partial))
            if final is not None:
                fsync_dir(final.parent)
        return result
    finally:
        os.close(fd)


def _adopt_complete_blob(blob: Path, partial: Path) -> None:
    """A complete blob left by a crash (or kept on a full disk) is a partial to reuse."""
    if not os.path.lexists(blob) or os.path.lexists(partial):
        return
    try:
        os.close(open_file(blob))
    except NotRegular:
        log.warning("discarding non-regular file at a blob path", extra={"path": str(blob)})
        unlink(blob)
        return
    except FileNotFoundError:
        return
    log.info("reusing downloaded blob (verified again)", extra={"path": str(blob)})
    with contextlib.suppress(FileNotFoundError):
        blob.replace(partial)


def _drop(partial: Path) -> None:
    unlink(partial)
    unlink(ranges_path(partial))


def _publish(fd: int, partial: Path, dest: Path) -> None:
    # Publish only the inode we verified; if it was swapped, let `ensure` start over.
    try:
        same = os.path.samestat(partial.stat(), os.fstat(fd))
    except FileNotFoundError:
        same = False
    if not same:
        raise Raced(f"{partial} was replaced or removed while we wrote it")
    partial.replace(dest)


async def _pipeline(
    filling: Filling,
    req: BlobRequest,
    opener: BlobOpener,
    progress: Callable[[int], None] | None,
    partial: Path,
    out: OutputSpec | None,
    tmp: Path | None,
    resumes: int,
    gate: Gate | None,
) -> os.stat_result:
    """Run the download and the reader side by side; the first failure stops both."""
    cancel = threading.Event()
    # The reader blocks on the download for its whole life: it gets a thread of its own,
    # never one of the loop's default executor, whose few workers the download's own
    # reads and writes need (several pipelines at once would otherwise starve them).
    reader = _own_thread(lambda: _consume(filling, req, out, tmp, cancel, gate))
    # Retrieve a late exception so asyncio does not log it as unhandled.
    reader.add_done_callback(lambda t: None if t.cancelled() else t.exception())
    writer = asyncio.ensure_future(fill(filling, req, opener, progress, partial, resumes))
    both: set[asyncio.Future[Any]] = {reader, writer}
    try:
        await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
        if writer.done():
            filling.finish(writer.exception())
            writer.result()  # the download's error, if any
        else:
            reader.result()  # the reader failed first (a bomb, a full disk)
            await writer  # unreachable unless the reader ended early without error
            filling.finish()
        return await asyncio.shield(reader)
    except BaseException as exc:
        # Stop both, and never leave the thread running with our fd and temp file.
        filling.finish(exc)
        cancel.set()
        writer.cancel()
        await asyncio.wait(both)
        raise


def _own_thread(fn: Callable[[], _T]) -> asyncio.Future[_T]:
    """`fn()` in a new daemon thread, as a future of the running loop."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def settle(result: _T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(cast(_T, result))

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:  # handed to the loop, raised there
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name="esa-install", daemon=True).start()
    return future


# -- the reader side (one worker thread) -----------------------------------------------------


class _Reader:
    """The partial as a file that grows: `read` waits for bytes and hashes what it returns."""

    def __init__(self, filling: Filling, hasher: Any | None, cancel: threading.Event) -> None:
        self.filling = filling
        self.hasher = hasher
        self.cancel = cancel
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        size = self.filling.size
        if self.pos >= size:
            return b""
        if self.cancel.is_set():
            raise Stopped
        end = self.filling.wait(self.pos, self.cancel)
        if end <= self.pos:
            raise _Aborted
        want = min(CHUNK if n < 0 else n, end - self.pos)
        data = os.pread(self.filling.fd, want, self.pos)
        if not data:
            raise Raced("the partial shrank under us")
        if self.hasher is not None:
            self.hasher.update(data)
        self.pos += len(data)
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


class _ChunkedReader(_Reader):
    """The partial, handed out one signed chunk at a time: `read` returns only bytes of
    chunks whose digest matched (docs/format.md §4), so a decoder reading from here
    follows the download without ever seeing a byte no signature vouched for."""

    def __init__(
        self,
        filling: Filling,
        req: BlobRequest,
        cancel: threading.Event,
        chunks: ChunkDigests,
        *,
        layer_digest: bool,
    ) -> None:
        # Signed chunk digests that cover every byte of the blob vouch for exactly the
        # bytes the layer digest does (docs/format.md §4): for an install (whose content
        # digest is checked too) the whole-layer SHA-256 would only repeat them. A blob
        # kept under its digest's name is still hashed as a whole (`layer_digest`).
        hashed = layer_digest or chunks.total != req.size
        super().__init__(filling, new_hasher(req.digest) if hashed else None, cancel)
        self.digest = req.digest
        self.chunks = chunks
        self.next = 0  # the next chunk to verify
        self.ready: list[bytes] = []  # verified bytes not yet handed out, in order

    def read(self, n: int = -1) -> bytes:
        if not self.ready:
            if self.next >= self.chunks.count:
                return b""
            self._verify_next()
        piece = self.ready[0]
        if 0 <= n < len(piece):
            self.ready[0] = piece[n:]
            return piece[:n]
        del self.ready[0]
        return piece

    def _verify_next(self) -> None:
        i = self.next
        start, end = self.chunks.span(i)
        hasher = hashlib.sha256()
        pieces = []
        while self.pos < end:
            # Pieces of at most CHUNK, the size the decoder asks for: handed out whole.
            piece = super().read(min(CHUNK, end - self.pos))
            if not piece:
                raise _Aborted
            hasher.update(piece)
            pieces.append(piece)
        if hasher.digest() != self.chunks.digest(i):
            raise _LayerMismatch(
                f"sha256:{hasher.hexdigest()}",
                f"chunk {i} (bytes {start}-{end - 1}) of blob {self.digest}",
                f"sha256:{self.chunks.digest(i).hex()}",
            )
        self.next += 1
        self.ready = pieces


def _consume(
    filling: Filling,
    req: BlobRequest,
    out: OutputSpec | None,
    tmp: Path | None,
    cancel: threading.Event,
    gate: Gate | None,
) -> os.stat_result:
    if gate is not None:
        # Not one byte of the partial is read before the release's signature verified.
        gate.wait(cancel, Stopped)
    if tmp is not None:
        make_dirs(tmp.parent)  # the version's directory: only for a verified release
    reader = (
        _Reader(filling, new_hasher(req.digest), cancel)
        if req.chunks is None
        else _ChunkedReader(filling, req, cancel, req.chunks, layer_digest=out is None)
    )
    if out is None or not out.compressed or tmp is None:
        reader.drain()
        _check_layer(reader, req)
        if out is not None:
            _check_uncompressed(reader, req, out)
            os.fchmod(filling.fd, file_mode(out.executable))
            os.fsync(filling.fd)
        return os.fstat(filling.fd)
    # No byte a signature does not vouch for reaches the decoder (docs/format.md §4).
    # With signed chunk digests, each chunk is decompressed as soon as it matched, while
    # the download goes on; the layer digest is checked at the end, before the rename.
    # Without them, the whole layer is hashed as it arrives and decompressed once its
    # digest matched, from the partial still in the page cache.
    streaming = req.chunks is not None
    verified = reader
    if not streaming:
        reader.drain()
        _check_layer(reader, req)
        verified = _Reader(filling, None, cancel)  # hashed already: not again
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    output: Output | None = None
    try:
        output = Output(fd, out, tmp)
        try:
            _decompress(verified, output, out, _MAX_WINDOW)
            output.close()  # every byte hashed and written (a full disk shows here)
        except _Undecodable as exc:
            raise AssetChecksumError(
                f"decompressed {out.name}",
                out.content_digest,
                f"undecodable zstd data ({exc})",
                out.source,
            ) from None
        except OSError as exc:
            if out_of_space(exc, tmp, "") is None:
                raise
            raise _KeptBlob(exc, tmp) from None
        if streaming:
            reader.drain()  # bytes after the last frame are part of the layer too
            _check_layer(reader, req)
        output.finish()
        os.fchmod(fd, file_mode(out.executable))
        os.fsync(fd)
        return os.fstat(fd)
    except BaseException:
        if output is not None:
            with contextlib.suppress(BaseException):
                output.close()  # its thread must be done with fd before it is closed
        os.close(fd)
        unlink(tmp)
        raise
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def _check_layer(reader: _Reader, req: BlobRequest) -> None:
    if reader.hasher is None:  # every chunk matched its signed digest: the same check
        return
    actual = digest_of(reader.hasher, req.digest)
    if actual != req.digest:
        raise _LayerMismatch(actual)


def _check_uncompressed(reader: _Reader, req: BlobRequest, out: OutputSpec) -> None:
    """An uncompressed layer is its content: its digest and size must be the content's."""
    if req.size != out.content_size:
        raise SizeLimitError(
            f"{out.name} from {out.source} is {req.size} bytes, "
            f"declared content size is {out.content_size}"
        )
    if out.content_digest != req.digest:
        actual = req.digest if reader.hasher is None else digest_of(reader.hasher, req.digest)
        if out.content_digest.partition(":")[0] != req.digest.partition(":")[0]:
            raise AssetChecksumError(out.name, out.content_digest, "another algorithm", out.source)
        raise AssetChecksumError(out.name, out.content_digest, actual, out.source)


class _Undecodable(Exception):
    pass


def _decompress(reader: _Reader, output: Output, out: OutputSpec, window: int) -> None:
    import zstandard  # only the cold path pays for it

    dctx = zstandard.ZstdDecompressor(max_window_size=window)
    try:
        with dctx.stream_reader(
            cast(IO[bytes], reader), read_size=CHUNK, read_across_frames=True, closefd=False
        ) as stream:
            while chunk := stream.read(CHUNK):
                output.write(chunk)
    except zstandard.ZstdError as exc:
        raise _Undecodable(str(exc)) from None


__all__ = ["OutputSpec", "ResumeFailed", "obtain"]
