"""Make the blobs of a release, and push each one while the next one compresses.

The documents need every blob's digest, but a blob can go up as soon as it is made,
so compressing and uploading overlap (measured: benchmarks/peers.py, "publish"):

    check inputs taken as they are (.zst, raw) -> compress, largest first
                                                 \\-> push thread: blob N to each target

Inputs taken as they are are checked first, so a corrupt `.zst` fails before the
first byte is uploaded. The largest files compress first, so what is left to upload
after the last compression is small. The publisher hands `BlobPusher` its targets
only when no target holds the version tag yet (or with `replace`): when one does,
the index must first be compared with it, and nothing is uploaded before that.
A blob is pushed with the targets' `push_blob` as before (skipped when present),
and the digests pushed to every target are not pushed again by `push_release`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from exec_sandbox_assets.oci.target import Target
from exec_sandbox_assets.publish.compress import Blob, compress_cached, inspect_zst, raw_blob
from exec_sandbox_assets.publish.inputs import InputFile, ReleaseInputs

if TYPE_CHECKING:
    from exec_sandbox_assets.client import Progress

log = logging.getLogger(__name__)


def prepare_blobs(
    inputs: ReleaseInputs,
    work_dir: Path,
    level: int,
    progress: Progress | None = None,
    on_ready: Callable[[Blob], None] | None = None,
) -> dict[str, Blob]:
    """Catalog name -> blob file (compressed in `work_dir`, or the input as is), in
    input order. `on_ready` gets each blob as it is made, once every input taken as
    it is has been checked."""
    dest_dir = work_dir / "compressed"
    out: dict[str, Blob] = {}
    as_is = [f for f in inputs.files if _taken_as_is(f)]
    to_compress = sorted(
        (f for f in inputs.files if not _taken_as_is(f)), key=lambda f: -f.path.stat().st_size
    )
    for item in as_is:
        out[item.spec.name] = (
            raw_blob(item.path) if not item.spec.compressed else inspect_zst(item.path)
        )
    if on_ready is not None:
        for item in as_is:
            on_ready(out[item.spec.name])
    for item in to_compress:
        out[item.spec.name] = blob = _compress(item, dest_dir, level, progress)
        if on_ready is not None:
            on_ready(blob)
    return {f.spec.name: out[f.spec.name] for f in inputs.files}


def _taken_as_is(item: InputFile) -> bool:
    """Published without compressing: a raw file (gvproxy) or a `.zst` input."""
    return item.precompressed or not item.spec.compressed


def _compress(item: InputFile, dest_dir: Path, level: int, progress: Progress | None) -> Blob:
    dest = dest_dir / item.spec.name
    if progress is None:
        return compress_cached(item.path, dest, level)
    label = f"compress {item.spec.output_name}"
    progress.start(label, item.path.stat().st_size)
    blob = compress_cached(item.path, dest, level, lambda n: progress.advance(label, n))
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


class BlobPusher:
    """Pushes blobs to every target, in the order given, on one thread of its own.

    `submit` raises the error of a push that failed, so compression stops at the next
    file; `finish` waits for the last push and raises it too. The thread is a daemon:
    an interrupted publish does not wait for an upload in flight (`abandon`).
    """

    def __init__(self, targets: Sequence[Target], progress: Progress | None = None) -> None:
        self._targets = tuple(targets)
        self._progress = progress
        self._queue: queue.SimpleQueue[Blob | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._pushed: set[str] = set()
        self._thread = threading.Thread(target=self._work, name="publish-push", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            while (blob := self._queue.get()) is not None:
                for target in self._targets:
                    if self._stop.is_set():
                        return
                    push_blob(target, blob, self._progress)
                self._pushed.add(blob.digest)
        except BaseException as exc:  # handed to the publishing thread
            self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, blob: Blob) -> None:
        self._raise()
        self._queue.put(blob)

    def finish(self) -> frozenset[str]:
        """Wait for every submitted push; the digests now on every target."""
        self._queue.put(None)
        self._thread.join()
        self._raise()
        return frozenset(self._pushed)

    def abandon(self, wait: bool) -> None:
        """Push nothing more; `wait` for an upload in flight (the targets are closed next)."""
        self._stop.set()
        self._queue.put(None)
        if wait:
            self._thread.join()


def make_and_push(
    inputs: ReleaseInputs,
    work_dir: Path,
    level: int,
    targets: Sequence[Target],
    progress: Progress | None = None,
) -> tuple[dict[str, Blob], frozenset[str]]:
    """`prepare_blobs`, each blob pushed to `targets` as it is made (none: only made).
    Returns the blobs and the digests that every target now holds."""
    if not targets:
        return prepare_blobs(inputs, work_dir, level, progress), frozenset()
    shared = LockedProgress(progress) if progress is not None else None
    pusher = BlobPusher(targets, shared)
    try:
        blobs = prepare_blobs(inputs, work_dir, level, shared, pusher.submit)
        return blobs, pusher.finish()
    except Exception:
        pusher.abandon(wait=True)
        raise
    except BaseException:  # KeyboardInterrupt: do not wait for the upload in flight
        pusher.abandon(wait=False)
        raise


__all__ = ["BlobPusher", "LockedProgress", "make_and_push", "prepare_blobs", "push_blob"]
