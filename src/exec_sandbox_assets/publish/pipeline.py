"""Make the blobs of a release on one thread while the publishing thread pushes them.

The documents need every blob's digest, but a blob can go up as soon as it is made
(measured: benchmarks/peers.py, "publish"; docs/performance.md):

    making thread:  check inputs taken as they are (.zst, raw) -> compress (small
                    files, then the rest largest first: `compression_order`)
    publishing:     connect to the targets, read vV -> push each blob as it comes

Compression starts as soon as the inputs are found, so it overlaps connecting to the
targets (and importing what that needs). Inputs taken as they are are checked before
any blob is handed over, so a corrupt `.zst` still fails before the first upload.
The publisher pushes early only when no target holds the version tag yet (or with
`replace`): otherwise the index must first be compared with the tag, and nothing is
uploaded before that. Blobs are pushed with the targets' `push_blob` as before
(skipped when present), all network I/O stays on the publishing thread, and the
digests already on every target are not pushed again by `push_release`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from exec_sandbox_assets.oci.target import Target
from exec_sandbox_assets.publish.compress import (
    Blob,
    OnBytes,
    compress_cached,
    inspect_zst,
    raw_blob,
)
from exec_sandbox_assets.publish.compress_worker import WORKER_MIN_SIZE, CompressWorker
from exec_sandbox_assets.publish.inputs import InputFile, ReleaseInputs

if TYPE_CHECKING:
    from exec_sandbox_assets.client import Progress

log = logging.getLogger(__name__)


# compress_cached's signature: (source, destination, level, progress) -> blob.
Compress = Callable[[Path, Path, int, OnBytes | None], Blob]


def prepare_blobs(
    inputs: ReleaseInputs,
    work_dir: Path,
    level: int,
    progress: Progress | None = None,
    on_ready: Callable[[Blob], None] | None = None,
    compress: Compress = compress_cached,
) -> dict[str, Blob]:
    """Catalog name -> blob file (compressed in `work_dir` by `compress`, or the input
    as is), in input order. `on_ready` gets each blob as it is made, once every input
    taken as it is has been checked."""
    dest_dir = work_dir / "compressed"
    out: dict[str, Blob] = {}
    as_is = [f for f in inputs.files if _taken_as_is(f)]
    to_compress = compression_order([f for f in inputs.files if not _taken_as_is(f)])
    for item in as_is:
        out[item.spec.name] = (
            raw_blob(item.path) if not item.spec.compressed else inspect_zst(item.path)
        )
    if on_ready is not None:
        for item in as_is:
            on_ready(out[item.spec.name])
    for item in to_compress:
        out[item.spec.name] = blob = _compress(item, dest_dir, level, progress, compress)
        if on_ready is not None:
            on_ready(blob)
    return {f.spec.name: out[f.spec.name] for f in inputs.files}


def compression_order(items: Sequence[InputFile]) -> list[InputFile]:
    """Small files (each at most 1/16 of the total) first, then the rest largest first.

    Blobs go up one at a time, in this order. The small ones compress in a moment and
    go up while the first large file compresses, a wait the upload would otherwise
    idle through; the large ones come largest first, so what is left to upload once
    the last file is compressed is small."""
    sizes = {item.spec.name: item.path.stat().st_size for item in items}
    small = sum(sizes.values()) / 16
    return sorted(
        items,
        key=lambda f: (sizes[f.spec.name] > small, -sizes[f.spec.name], f.spec.name),
    )


def _taken_as_is(item: InputFile) -> bool:
    """Published without compressing: a raw file (gvproxy) or a `.zst` input."""
    return item.precompressed or not item.spec.compressed


def _compress(
    item: InputFile, dest_dir: Path, level: int, progress: Progress | None, compress: Compress
) -> Blob:
    dest = dest_dir / item.spec.name
    if progress is None:
        return compress(item.path, dest, level, None)
    label = f"compress {item.spec.output_name}"
    progress.start(label, item.path.stat().st_size)
    blob = compress(item.path, dest, level, lambda n: progress.advance(label, n))
    progress.finish(label)
    return blob


def push_blob(target: Target, blob: Blob, progress: Progress | None) -> None:
    """One blob to one target, shown as a step of the progress."""
    label = f"push {blob.path.name} -> {target.name}"
    if progress is not None:
        progress.start(label, blob.size)
    target.push_blob(blob.path, blob.digest, blob.size)
    if progress is not None:
        progress.finish(label)


class LockedProgress:
    """A `Progress` called from the compressing and the pushing thread at once."""

    def __init__(self, inner: Progress) -> None:
        self._inner = inner
        self._lock = threading.Lock()

    def start(self, name: str, total: int) -> None:
        with self._lock:
            self._inner.start(name, total)

    def advance(self, name: str, nbytes: int) -> None:
        with self._lock:
            self._inner.advance(name, nbytes)

    def finish(self, name: str) -> None:
        with self._lock:
            self._inner.finish(name)


class _Stopped(Exception):
    """Raised in the making thread when the publish no longer wants its blobs."""


class BlobMaker:
    """Makes the blobs on a thread of its own (`prepare_blobs`), from the moment the
    inputs are found: compression overlaps connecting to the targets, and the publishing
    thread pushes each blob as it comes (`ready`). Files of `WORKER_MIN_SIZE` or more are
    compressed in a child process (compress_worker.py), so that `stop` ends a
    compression under way at once (a kill) and the others at their next chunk."""

    def __init__(
        self, inputs: ReleaseInputs, work_dir: Path, level: int, progress: Progress | None
    ) -> None:
        self._queue: queue.SimpleQueue[Blob | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._blobs: dict[str, Blob] | None = None
        self._error: BaseException | None = None
        self._worker = CompressWorker()
        if any(_in_worker(f.path) for f in inputs.files if not _taken_as_is(f)):
            self._worker.start()  # its start-up overlaps compressing the small files
        self._thread = threading.Thread(
            target=self._work,
            args=(inputs, work_dir, level, _Stoppable(progress, self._stop)),
            name="publish-compress",
            daemon=True,
        )
        self._thread.start()

    def _work(self, inputs: ReleaseInputs, work_dir: Path, level: int, progress: Progress) -> None:
        try:
            self._blobs = prepare_blobs(
                inputs, work_dir, level, progress, self._queue.put, self._compress
            )
        except BaseException as exc:  # handed to the publishing thread
            self._error = exc
        finally:
            self._queue.put(None)

    def _compress(self, src: Path, dest: Path, level: int, on_bytes: OnBytes | None) -> Blob:
        if _in_worker(src):
            return self._worker.compress(src, dest, level, on_bytes)
        return compress_cached(src, dest, level, on_bytes)

    def ready(self) -> Iterator[Blob]:
        """Each blob as it is made; raises what stopped the making."""
        while (blob := self._queue.get()) is not None:
            yield blob
        self._queue.put(None)  # a later `ready` or `result` ends too
        self.result()

    def result(self) -> dict[str, Blob]:
        """Every blob (waits for them), as `prepare_blobs` returns them."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._blobs is not None
        return self._blobs

    def stop(self) -> None:
        """Make nothing more, and wait until the thread has let go of the work dir: at
        once for a file in the child process (killed), at its next chunk for the others."""
        self._stop.set()
        self._worker.kill()
        self._thread.join()
        self._worker.close()


def _in_worker(path: Path) -> bool:
    return path.stat().st_size >= WORKER_MIN_SIZE


class _Stoppable:
    """The compression's progress, which also ends it once `stop` is set."""

    def __init__(self, inner: Progress | None, stop: threading.Event) -> None:
        self._inner = inner
        self._stop = stop

    def start(self, name: str, total: int) -> None:
        if self._inner is not None:
            self._inner.start(name, total)

    def advance(self, name: str, nbytes: int) -> None:
        if self._stop.is_set():
            raise _Stopped(name)
        if self._inner is not None:
            self._inner.advance(name, nbytes)

    def finish(self, name: str) -> None:
        if self._inner is not None:
            self._inner.finish(name)


def push_as_made(
    maker: BlobMaker, targets: Sequence[Target], progress: Progress | None
) -> frozenset[str]:
    """Push each blob to every target as `maker` makes it; the digests pushed."""
    if not targets:
        return frozenset()
    pushed: set[str] = set()
    for blob in maker.ready():
        for target in targets:
            push_blob(target, blob, progress)
        pushed.add(blob.digest)
    return frozenset(pushed)


__all__ = [
    "BlobMaker",
    "LockedProgress",
    "compression_order",
    "prepare_blobs",
    "push_as_made",
    "push_blob",
]
