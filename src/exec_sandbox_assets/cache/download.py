"""Blob download into a resumable `.partial`: one or several ranged streams, one resume loop.

The bytes land in `blobs/<algo>/<hex>.partial` at their offsets; `Filling` tells the
one reader of the partial (`install`, in a worker thread) how far the bytes from 0 are
contiguous, so hashing and decompression follow the download instead of waiting for it.

- One stream for small blobs. Large blobs are split into up to `MAX_RANGES` ranges, each
  fetched by its own connection (a CDN edge often caps one stream): a range stops at its
  end, or carries on into the next one when that one has not started yet (a source that
  ignores `Range` then costs one stream, not several). Each range's progress is written
  to a small `.ranges` file beside the partial, so an interruption resumes every range
  where it stopped; without that file a partial is a contiguous prefix.
- Whatever the plan, a range is split in two while it runs when its measured rate says
  it would still take longer than `SPLIT_AFTER` and a few of its first-byte times (the
  cost of another connection): on a link that caps each connection, a blob of a few MB
  gains a second stream; on an uncapped one it finishes before any split. One split at
  a time, and only while each made the blob come faster (`SPLIT_GAIN`): when the link's
  total or this machine's CPU is the bottleneck, more streams would only cost. A small
  blob keeps one stream and shares the pool's connections with the others.
- A body that broke off after making progress is reopened at the new offset, up to
  `MAX_RESUMES` times per range with exponential backoff: moving on to the next source,
  or failing, would waste what this one just sent.
- Nothing here decides trust: the reader hashes every byte it reads, and nothing is
  published before the whole digest matched.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import struct
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from exec_sandbox_assets.base.errors import AssetDownloadError, SizeLimitError, TransportError
from exec_sandbox_assets.base.fsutil import out_of_space
from exec_sandbox_assets.cache.files import Stopped, in_thread, unlink, write_all

if TYPE_CHECKING:
    from exec_sandbox_assets.release.chunks import ChunkDigests

log = logging.getLogger("exec_sandbox_assets.cache.store")

BlobOpener = Callable[[int], AbstractAsyncContextManager[AsyncIterator[bytes]]]
"""Given a byte offset, opens a stream of the blob's bytes from that offset."""

# A broken body is reopened from the same source this many times per range.
MAX_RESUMES = 4
RESUME_BASE_DELAY = 0.1
RESUME_MAX_DELAY = 2.0
# Ranged download: blobs of at least 2 parts; parts of at least RANGE_PART bytes. Eight
# for blobs of 128 MiB and more: through a link capping each connection at 50 MB/s (a
# CDN edge), a 1 GB blob took 7.3-7.6 s over 4 connections, 5.3-5.7 s over 8 (curl,
# one connection: 21.5 s); on an uncapped link more connections cost nothing measurable.
RANGE_PART = 16 << 20
MAX_RANGES = 8
# A range with no byte yet when its predecessor is this far along is given up (the
# source probably ignores Range and is sending the blob from 0 again).
RANGE_STALL = 8 << 20
# Splitting while running (see the module docstring): looked at every SPLIT_TICK seconds;
# neither half smaller than MIN_SPLIT (a signed chunk); worth it when the range would
# still take SPLIT_AFTER seconds and FIRST_BYTES times its first-byte time.
SPLIT_TICK = 0.05
MIN_SPLIT = 4 << 20
# A split is kept up only if the blob's rate over SPLIT_WINDOW seconds after the new
# stream's first byte is SPLIT_GAIN times what it was before; otherwise no more splits.
SPLIT_WINDOW = 0.2
SPLIT_GAIN = 1.2
# Splitting stops at this many unfinished ranges (the plan may have more): each range
# in flight is what a kill loses (the resume figure), and on a link whose total rate is
# the bottleneck more streams only share it.
SPLIT_LIMIT = 4
SPLIT_AFTER = 0.25
FIRST_BYTES = 4
_RANGES_MAGIC = b"ESARNG1\0"
_SLOT = struct.Struct("<QQQ")


class OverSentError(SizeLimitError):
    """A source sent more than the blob's size: its extra bytes are dropped, the earlier
    ones (other attempts' too) are kept for resume."""


@dataclass(frozen=True)
class BlobRequest:
    """A blob to download: its digest, its exact size, and where it comes from (for messages)."""

    digest: str
    size: int
    source: str
    # Signed per-chunk digests: each chunk is checked the moment it is complete.
    chunks: ChunkDigests | None = None


class _Range:
    __slots__ = ("anchor", "end", "first", "got", "opened", "pos", "slot", "start", "task")

    def __init__(self, slot: int, start: int, pos: int, end: int) -> None:
        self.slot, self.start, self.pos, self.end = slot, start, pos, end
        self.task: asyncio.Task[None] | None = None
        # Where the predecessor stood when this range was split off it (stall check).
        self.anchor: int | None = None
        # The rate measure: when the stream was opened, its first byte, bytes since.
        self.opened = self.first = 0.0
        self.got = 0


class Filling:
    """A partial being filled at offsets, and how far it is contiguous from 0.

    Shared between the event loop (writers) and one reader thread: `contiguous`, `done`
    and `error` change under `cond`.
    """

    def __init__(self, fd: int, size: int, ranges: list[_Range], sidecar: Path | None) -> None:
        self.fd = fd
        self.size = size
        self.ranges = ranges
        self.sidecar = sidecar
        self.cond = threading.Condition()
        self.contiguous = 0
        self.done = False
        self.error: BaseException | None = None
        self._update()

    @property
    def have(self) -> int:
        """Bytes already on disk (where each range resumes from), for progress."""
        return sum(r.pos - r.start for r in self.ranges)

    def _update(self) -> None:
        contiguous = 0
        for r in sorted(self.ranges, key=lambda r: r.start):
            if r.start > contiguous:
                break
            contiguous = r.pos
            if r.pos < r.end:
                break
        with self.cond:
            self.contiguous = contiguous
            self.cond.notify_all()

    def advanced(self, r: _Range) -> None:
        if self.sidecar is not None:
            self.save(r)
        self._update()

    def finish(self, error: BaseException | None = None) -> None:
        with self.cond:
            self.done = True
            self.error = error
            self.cond.notify_all()

    def wait(self, pos: int, cancel: threading.Event) -> int:
        """Block until bytes beyond `pos` are contiguous; returns the contiguous end.

        Returns `pos` when the download ended (or failed) without more bytes."""
        with self.cond:
            while self.contiguous <= pos and not self.done:
                if cancel.is_set():
                    raise Stopped
                self.cond.wait(0.1)
            return self.contiguous

    # -- the `.ranges` file: one slot (start, pos, end) per range --------------------------

    def save(self, r: _Range) -> None:
        with contextlib.suppress(OSError):
            fd = os.open(self.sidecar, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)  # type: ignore[arg-type]
            try:
                os.pwrite(
                    fd, _SLOT.pack(r.start, r.pos, r.end), len(_RANGES_MAGIC) + r.slot * _SLOT.size
                )
            finally:
                os.close(fd)

    def create_sidecar(self, path: Path) -> None:
        slots = bytearray(_SLOT.size * (1 + max(r.slot for r in self.ranges)))
        for r in self.ranges:  # at its slot: `save` writes there later
            _SLOT.pack_into(slots, r.slot * _SLOT.size, r.start, r.pos, r.end)
        data = _RANGES_MAGIC + bytes(slots)
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
        )
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
        self.sidecar = path


def ranges_path(partial: Path) -> Path:
    return partial.with_name(partial.name + ".ranges")


def plan(fd: int, size: int, partial: Path, *, ranged: bool) -> Filling:
    """Where each range of the blob resumes, from the partial and its `.ranges` file."""
    sidecar = ranges_path(partial)
    have = os.fstat(fd).st_size
    saved = _load_ranges(sidecar, size) if have <= size else None
    if saved is not None and all(r.pos <= have for r in saved):
        return Filling(fd, size, saved, sidecar)
    unlink(sidecar)
    if have > size:
        log.warning("partial larger than its blob; restarting", extra={"path": str(partial)})
        os.ftruncate(fd, 0)
        have = 0
    left = size - have
    parts = min(MAX_RANGES, left // RANGE_PART) if ranged else 1
    if parts < 2:
        return Filling(fd, size, [_Range(0, 0, have, size)], None)
    bounds = [have + left * i // parts for i in range(parts + 1)]
    ranges = [_Range(i, bounds[i], bounds[i], bounds[i + 1]) for i in range(parts)]
    if have:  # the prefix already on disk: a done range of its own, for `contiguous`
        ranges.insert(0, _Range(parts, 0, have, have))
    filling = Filling(fd, size, ranges, None)
    # Before any byte lands beyond the prefix: without this file, a partial is read as
    # a contiguous prefix (its size), which holes left by other ranges would break.
    filling.create_sidecar(sidecar)
    return filling


def _load_ranges(path: Path, size: int) -> list[_Range] | None:
    try:
        with open(path, "rb") as f:
            data = f.read(4096)
    except OSError:
        return None
    body = data[len(_RANGES_MAGIC) :]
    if not data.startswith(_RANGES_MAGIC) or not body or len(body) % _SLOT.size:
        return None
    ranges = [
        _Range(i, *_SLOT.unpack_from(body, i * _SLOT.size)) for i in range(len(body) // _SLOT.size)
    ]
    ranges = [r for r in ranges if r.end > r.start]  # slots of merged ranges are empty
    edge = 0
    for r in sorted(ranges, key=lambda r: r.start):
        if r.start != edge or not r.start <= r.pos <= r.end:
            return None
        edge = r.end
    return ranges if edge == size else None


async def fill(
    filling: Filling,
    req: BlobRequest,
    opener: BlobOpener,
    progress: Callable[[int], None] | None,
    partial: Path,
    resumes: int = MAX_RESUMES,
) -> None:
    """Download every missing byte of the blob into the partial; raises the first failure
    (a range's last), after stopping the other ranges."""
    todo = [r for r in filling.ranges if r.pos < r.end]
    if progress is not None and filling.have:
        progress(filling.have)

    def start(r: _Range) -> asyncio.Task[None]:
        r.task = asyncio.ensure_future(
            _fetch_range(filling, r, req, opener, progress, partial, resumes)
        )
        return r.task

    tasks = [start(r) for r in todo]
    splitter = asyncio.ensure_future(_split_slow_ranges(filling, partial, start, tasks))
    try:
        while pending := [t for t in tasks if not t.done()]:
            done, _ = await asyncio.wait([*pending, splitter], return_when=asyncio.FIRST_COMPLETED)
            if splitter in done:
                splitter.result()  # an OSError writing the `.ranges` file
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        missing = [r for r in filling.ranges if r.pos < r.end]
        if missing:
            got = sum(r.pos - r.start for r in filling.ranges)
            raise AssetDownloadError(
                f"truncated download of blob {req.digest} from {req.source}: "
                f"got {got} of {req.size} bytes (partial kept for resume)"
            )
    finally:
        splitter.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(splitter, *tasks, return_exceptions=True)


async def _split_slow_ranges(
    filling: Filling,
    partial: Path,
    start: Callable[[_Range], asyncio.Task[None]],
    tasks: list[asyncio.Task[None]],
) -> None:
    """Split a running range in two while its measured rate says another connection
    would pay for itself (module docstring); up to `SPLIT_LIMIT` unfinished ranges."""
    loop = asyncio.get_running_loop()
    seen: list[tuple[float, int]] = []  # (time, bytes on disk) at each tick
    trial: tuple[_Range, float] | None = None  # the last split and the rate before it
    while True:
        await asyncio.sleep(SPLIT_TICK)
        now = loop.time()
        seen.append((now, filling.have))
        if trial is not None:
            new, before = trial
            if not new.first or now - new.first < SPLIT_WINDOW:
                continue  # the new stream has not shown what it adds yet
            if _rate(seen) < SPLIT_GAIN * before:
                # Another stream did not make the blob come faster: the bottleneck is
                # not the connection (the link's total, or this machine's CPU).
                return
            trial = None
        running = [r for r in filling.ranges if r.pos < r.end and r.first and r.task]
        for r in sorted(running, key=lambda r: r.pos - r.end):  # most left first
            if sum(1 for x in filling.ranges if x.pos < x.end) >= SPLIT_LIMIT:
                break
            left, took = r.end - r.pos, now - r.first
            if left < 2 * MIN_SPLIT or took < SPLIT_WINDOW or not r.got:
                continue
            if left * took / r.got < max(SPLIT_AFTER, FIRST_BYTES * (r.first - r.opened)):
                continue
            new = _split(filling, r, partial)
            tasks.append(start(new))
            trial = (new, _rate(seen))
            break  # one at a time: each split must pay before the next


def _rate(seen: list[tuple[float, int]]) -> float:
    """Bytes/s over the last SPLIT_WINDOW seconds of `seen`."""
    now, have = seen[-1]
    then, had = next(((t, h) for t, h in reversed(seen) if now - t >= SPLIT_WINDOW), seen[0])
    return (have - had) / (now - then) if now > then else 0.0


def _split(filling: Filling, r: _Range, partial: Path) -> _Range:
    """The second half of what `r` has left, as a new range (recorded in the `.ranges`
    file before any byte of it lands: without it the partial reads as a prefix)."""
    middle = r.pos + (r.end - r.pos) // 2
    new = _Range(1 + max(x.slot for x in filling.ranges), middle, middle, r.end)
    new.anchor = r.pos
    r.end = middle
    filling.ranges.append(new)
    if filling.sidecar is None:
        filling.create_sidecar(ranges_path(partial))
    else:
        filling.save(r)
        filling.save(new)
    log.debug("range split", extra={"at": middle, "ranges": len(filling.ranges)})
    return new


async def _fetch_range(
    filling: Filling,
    r: _Range,
    req: BlobRequest,
    opener: BlobOpener,
    progress: Callable[[int], None] | None,
    partial: Path,
    resumes: int,
) -> None:
    for resume in range(resumes + 1):
        before = r.pos
        try:
            await _stream(filling, r, req, opener, progress, partial)
            return
        except TransportError as exc:
            if r.pos <= before or resume == resumes:
                raise
            delay = min(RESUME_MAX_DELAY, RESUME_BASE_DELAY * 2**resume)
            log.info(
                "download broke off at %d of %d bytes; resuming from the same source in %.2fs",
                r.pos,
                req.size,
                delay,
                extra={"source": req.source, "digest": req.digest, "error": str(exc)},
            )
            await asyncio.sleep(delay)


async def _stream(
    filling: Filling,
    r: _Range,
    req: BlobRequest,
    opener: BlobOpener,
    progress: Callable[[int], None] | None,
    partial: Path,
) -> None:
    began = r.pos
    r.opened, r.first, r.got = asyncio.get_running_loop().time(), 0.0, 0
    async with opener(r.pos) as stream:
        async for chunk in stream:
            if not chunk:
                continue
            if r.pos >= r.end and not _take_over(filling, r):
                return  # our range is complete: the next one is being fetched
            if r.pos + len(chunk) > r.end:
                if r.end == req.size:
                    # This source lies about the blob: drop what it sent in this call,
                    # keep what earlier attempts fetched.
                    _drop_since(filling, r, began, partial)
                    raise OverSentError(
                        f"{req.source} sent more than the {req.size} bytes of blob {req.digest}"
                    )
                head = r.end - r.pos
                await _write(filling, r, chunk[:head], partial, progress)
                if not _take_over(filling, r):
                    return
                chunk = chunk[head:]
            await _write(filling, r, chunk, partial, progress)
            _give_up_stalled(filling, r)
    if r.pos < r.end:
        raise AssetDownloadError(
            f"truncated download of blob {req.digest} from {req.source}: "
            f"got {filling.have} of {req.size} bytes (partial kept for resume)"
        )


async def _write(
    filling: Filling,
    r: _Range,
    data: bytes,
    partial: Path,
    progress: Callable[[int], None] | None,
) -> None:
    try:
        # In a thread: write() stalls for tens of ms under writeback pressure, which
        # starves the loop when downloads run in parallel.
        await in_thread(functools.partial(_write_at, filling.fd, data, r.pos))
    except OSError as exc:
        if (full := out_of_space(exc, partial, "partial kept for resume")) is not None:
            raise full from exc
        raise
    r.pos += len(data)
    r.got += len(data)
    if not r.first:
        r.first = asyncio.get_running_loop().time()
    filling.advanced(r)
    if progress is not None:
        progress(len(data))


def _drop_since(filling: Filling, r: _Range, began: int, partial: Path) -> None:
    r.pos = began
    if filling.sidecar is not None:
        filling.advanced(r)
    elif began:
        os.ftruncate(filling.fd, began)
    else:
        unlink(partial)


def _write_at(fd: int, data: bytes, offset: int, _cancel: threading.Event) -> None:
    write_all(fd, data, offset)


def _next(filling: Filling, r: _Range) -> _Range | None:
    return next((n for n in filling.ranges if n.start == r.end and n is not r), None)


def _take_over(filling: Filling, r: _Range) -> bool:
    """At the end of `r`: carry on into the next range if nobody has fetched any of it."""
    nxt = _next(filling, r)
    if nxt is None or nxt.pos > nxt.start:
        return False
    if nxt.task is not None and nxt.task is not asyncio.current_task():
        nxt.task.cancel()
    filling.ranges.remove(nxt)
    r.end = nxt.end
    if filling.sidecar is not None:
        filling.save(r)
        nxt.pos = nxt.end = nxt.start  # its slot now says "empty"
        filling.save(nxt)
    return True


def _give_up_stalled(filling: Filling, r: _Range) -> None:
    nxt = _next(filling, r)
    if (
        nxt is not None
        and nxt.pos == nxt.start
        and r.pos - max(r.start, nxt.anchor or 0) >= RANGE_STALL
        and nxt.task is not None
        and not nxt.task.done()
    ):
        log.debug("range not started; merging it into its predecessor", extra={"start": nxt.start})
        nxt.task.cancel()
        nxt.task = None


__all__ = ["MAX_RESUMES", "BlobOpener", "BlobRequest", "Filling", "fill", "plan", "ranges_path"]
