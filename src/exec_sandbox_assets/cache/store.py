"""The on-disk cache the scheduler boots from.

Layout under `root`::

    blobs/<algo>/<hex>.partial      resumable download (bytes of the blob at their offsets)
    blobs/<algo>/<hex>.partial.ranges  per-range progress of a ranged download
    blobs/<algo>/<hex>              verified blob not yet installed (a full disk kept it)
    locks/                          fcntl lock files (never deleted: unlinking races lockers)
    v<version>/<name>               decompressed, verified file the scheduler reads
    v<version>/.verified/<name>.json  record of the verification, with the file's stat
    refs/<key>.json                 small JSON state (floating tags, rollback state)

Rules (DESIGN.md):
- Correctness never depends on a lock (`locks`). Locks (per output, then per blob) only
  avoid duplicate downloads. Every writer verifies the full digests of what it is about
  to publish, then publishes with one atomic rename (`install`).
- Every write goes to a temp name in the target directory, is fsynced, then renamed, and
  the directory fsynced. A `kill -9` at any moment leaves the old state or the new one,
  plus a `.partial` the next run resumes from (`download`).
- The warm path (`lookup`) is a `stat` compared against the record: no hashing. A file
  without a matching record is never trusted; it is reinstalled. A content check that
  fails (`content`: `verify --full`, `pull --force`, or the opt-in boot-path check of
  `content_check_after`) removes the record, so a corrupt file is fetched again. A record also says what
  admitted it (the key ids that verified its release, or "unverified"), and `lookup`
  serves it only if the current trust settings (`CacheTrust`) would have admitted it.
- Threat model: the cache directory belongs to the user. Whoever can write it can change
  what boots (records are not signed), so tampering is out of scope. But the store never
  follows a symlink or opens a FIFO/device at one of its own file paths (`files`), its
  directories are never group/world-writable, and every OS error is a `CacheError`.

Only the stdlib is imported at module load; `zstandard` when an output is decompressed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from exec_sandbox_assets.base.errors import AssetDownloadError
from exec_sandbox_assets.base.fsutil import out_of_space
from exec_sandbox_assets.cache import content, listing
from exec_sandbox_assets.cache.download import MAX_RESUMES, BlobOpener, BlobRequest
from exec_sandbox_assets.cache.files import (
    TMP_MARK,
    Raced,
    io_error,
    make_dirs,
    temp_owner,
    unlink,
)
from exec_sandbox_assets.cache.gate import Gate
from exec_sandbox_assets.cache.install import OutputSpec, obtain
from exec_sandbox_assets.cache.listing import VERSION_RE, RecordInfo
from exec_sandbox_assets.cache.locks import FileLock
from exec_sandbox_assets.cache.records import UNVERIFIED, CacheTrust, Record, RecordBook
from exec_sandbox_assets.cache.refs import Refs
from exec_sandbox_assets.oci.model import check_digest, digest_hex
from exec_sandbox_assets.release.catalog import MAX_NAME_LENGTH

log = logging.getLogger(__name__)

# Without working locks (NFS, ENOLCK) concurrent writers can keep replacing each other's
# files; a jittered pause, growing with each try, desynchronises them, and each retry
# first checks whether another writer has finished. ~40 s of backoff in all, at most.
_MAX_RACE_RETRIES = 24
_RACE_BACKOFF = 0.15


class Store:
    """Verified per-version outputs, their records, refs; downloads through `install`."""

    def __init__(
        self,
        root: Path,
        *,
        lock_timeout: float = 1800.0,
        trust: CacheTrust | None = None,
        content_check_after: float | None = None,
    ) -> None:
        """`content_check_after` (seconds): `lookup` hashes a file once per Store (that is,
        per process start of a client) when its last content check is that old; None: never
        (the warm path stays a stat)."""
        self.root = Path(root)
        self.lock_timeout = lock_timeout
        self.trust = trust
        self.content_check_after = content_check_after
        self._content_seen: set[str] = set()
        self.records = RecordBook()
        self._paths: dict[tuple[str, str], tuple[Path, str, str]] = {}
        self.refs = Refs(self.root / "refs")

    # -- paths ----------------------------------------------------------------------------

    def version_dir(self, version: str) -> Path:
        _check_version(version)
        return self.root / f"v{version}"

    def output_path(self, version: str, name: str) -> Path:
        _check_name(name)
        return self.version_dir(version) / name

    def record_path(self, version: str, name: str) -> Path:
        return self.version_dir(version) / ".verified" / f"{name}.json"

    def blob_path(self, digest: str) -> Path:
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

    def lookup(self, version: str, name: str, *, content_digest: str | None = None) -> Path | None:
        """The verified file, if its stat still matches its record and the record's
        verification is one the current trust settings admit; no hashing.

        With `content_digest`, the record must also name that digest (a cache filled from
        another release under the same version string is not this one).
        """
        try:
            path, path_s, record_s = self._paths_of(version, name)
        except ValueError as exc:
            # A corrupt ref must not crash the boot path: it is just a cache miss.
            log.warning("cache lookup refused", extra={"error": str(exc)})
            return None
        record = self.records.read(record_s)
        if record is None:
            return None
        if content_digest is not None and record.content_digest != content_digest:
            log.debug("cached file has another digest", extra={"path": str(path)})
            return None
        if self.trust is not None and not self.trust.admits(record.verified_by):
            log.info(
                "cached file was admitted by a verification the trust settings no longer "
                "accept; fetching it again",
                extra={"path": str(path), "verified_by": record.verified_by},
            )
            return None
        try:
            st = os.stat(path_s)  # noqa: PTH116 - a str: no Path work on the boot path
        except OSError as exc:
            log.debug("cached file missing", extra={"path": path_s, "error": str(exc)})
            return None
        if not record.matches(st):
            log.debug("cached file changed since it was verified", extra={"path": str(path)})
            return None
        if self.content_check_after is not None and path_s not in self._content_seen:
            return self._checked_lookup(version, name, path, record)
        return path

    def _checked_lookup(self, version: str, name: str, path: Path, record: Record) -> Path | None:
        """`lookup` with the opt-in content check (EXEC_SANDBOX_VERIFY_CONTENT_AFTER)."""
        assert self.content_check_after is not None
        if content.due(record, self.content_check_after):
            try:
                state = self.check_content(version, name)
            except (OSError, ValueError) as exc:
                # An unreadable file or a record that cannot be rewritten: not served.
                log.warning("content check failed", extra={"path": str(path), "error": str(exc)})
                return None
            if state != "ok":
                return None
        self._content_seen.add(str(path))
        return path

    def check_content(
        self, version: str, name: str, *, restat: bool = False
    ) -> content.ContentState:
        """Hash the cached file against its record; a mismatch removes the record so the
        next pull or boot fetches the file again (see `content`)."""
        state = content.check_content(self, version, name, restat=restat)
        if state in ("ok", "restated"):
            self._content_seen.add(str(self.output_path(version, name)))
        return state

    def read_record(self, version: str, name: str) -> Record | None:
        return self.records.read(self._paths_of(version, name)[2])

    def _paths_of(self, version: str, name: str) -> tuple[Path, str, str]:
        """(output path, as str, record path as str), validated once per name: pathlib
        costs more than the two stats of a warm lookup."""
        hit = self._paths.get((version, name))
        if hit is None:
            path = self.output_path(version, name)
            hit = (path, str(path), str(self.record_path(version, name)))
            self._paths[(version, name)] = hit
        return hit

    # -- cold path ------------------------------------------------------------------------

    async def ensure(
        self,
        out: OutputSpec,
        opener: BlobOpener,
        progress: Callable[[int], None] | None = None,
        *,
        resumes: int = MAX_RESUMES,
        gate: Gate | None = None,
    ) -> Path:
        """The verified output file, downloading and installing it if needed.

        With a `gate` (the release's signature still being checked), the blob downloads
        into its partial at once; nothing is read from it, decompressed or installed
        before the gate opens, and the record names the key ids the gate opened with.

        `progress` receives byte counts as they are obtained: once with what a download
        resumes from (or the size of a complete blob found on disk), then per chunk. A
        body that breaks off after making progress is resumed up to `resumes` times.
        Every OS error on the cache is a CacheError naming the path.
        """
        _check_name(out.name)
        _check_version(out.version)
        check_digest(out.layer_digest)
        check_digest(out.content_digest)
        if out.layer_size < 0 or out.content_size < 0:
            raise ValueError(f"negative size in {out}")
        try:
            return await self._ensure(out, opener, progress, resumes, gate)
        except OSError as exc:
            where = self.version_dir(out.version)
            full = out_of_space(exc, where, "partial kept for resume")
            raise full or io_error(exc, "install into", where) from exc

    async def _ensure(
        self,
        out: OutputSpec,
        opener: BlobOpener,
        progress: Callable[[int], None] | None,
        resumes: int,
        gate: Gate | None,
    ) -> Path:
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
                        return await self._fetch_and_install(out, opener, progress, resumes, gate)
            except Raced as exc:
                log.warning(
                    "cache changed under us (concurrent writer without working locks); retrying",
                    extra={
                        "output": out.name,
                        "version": out.version,
                        "attempt": attempt,
                        "error": str(exc),
                    },
                )
                backoff = _RACE_BACKOFF * min(attempt + 1, 8)
                await asyncio.sleep(random.uniform(0, backoff))  # noqa: S311
        raise AssetDownloadError(
            f"could not install {out.name} {out.version}: other writers kept changing the cache "
            f"at {self.root} (are file locks working on this file system?)"
        )

    async def _fetch_and_install(
        self,
        out: OutputSpec,
        opener: BlobOpener,
        progress: Callable[[int], None] | None,
        resumes: int,
        gate: Gate | None,
    ) -> Path:
        started = time.monotonic()
        req = BlobRequest(out.layer_digest, out.layer_size, out.source, out.chunks)
        blob = self.blob_path(out.layer_digest)
        make_dirs(blob.parent)
        final = self.output_path(out.version, out.name)  # made once the release verified
        st = await obtain(
            blob, req, opener, progress, final=final, out=out, resumes=resumes, gate=gate
        )
        if gate is not None:  # open, or obtain raised: who verified the release
            out = dataclasses.replace(out, verified_by=gate.verified_by)
        await asyncio.to_thread(
            self.records.write, self.record_path(out.version, out.name), out, st
        )
        self._content_seen.add(str(final))  # every byte was just hashed: not again
        # Without working locks another writer may have replaced the file after our
        # rename: then our record does not describe it, and we start over.
        if self.lookup(out.version, out.name, content_digest=out.content_digest) is None:
            raise Raced(f"{final} was replaced while its record was written")
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
        prefix = f".{out.name}{TMP_MARK}"
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.version_dir(out.version)):
                if entry.name.startswith(prefix):
                    log.info(
                        "removing temp file of an interrupted install", extra={"path": entry.path}
                    )
                    unlink(Path(entry.path))

    async def fetch_blob(
        self,
        req: BlobRequest,
        opener: BlobOpener,
        progress: Callable[[int], None] | None = None,
        *,
        resumes: int = MAX_RESUMES,
    ) -> Path:
        """Download `req` (resuming a partial) and return the path of the verified blob.

        A body that broke off after making progress is resumed `resumes` times within the
        call, as `ensure` does; a partial always survives for the next call. Callers should hold
        `blob_lock(req.digest)` to avoid duplicate work; correctness does not depend on it.
        """
        blob = self.blob_path(req.digest)
        try:
            make_dirs(blob.parent)
            await obtain(blob, req, opener, progress, resumes=resumes)
        except OSError as exc:
            raise io_error(exc, "download into", blob.parent) from exc
        return blob

    # -- refs -----------------------------------------------------------------------------

    def read_state(self, key: str) -> dict[str, Any] | None:
        """The small JSON state under `key` (a floating tag, rollback state), or None."""
        return self.refs.read(key)

    def write_state(self, key: str, data: dict[str, Any]) -> None:
        self.refs.write(key, data)

    # -- introspection (status / gc): see `listing` -----------------------------------------

    def versions(self) -> list[str]:
        return listing.versions(self)

    def outputs(self, version: str) -> list[RecordInfo]:
        """Every output of `version`: files with or without a record, records without a file."""
        return listing.outputs(self, version)

    def partials(self) -> list[tuple[Path, int]]:
        """Resumable downloads and their sizes."""
        return listing.partials(self)

    def blobs(self) -> list[tuple[Path, int]]:
        """Complete blobs not yet installed (left by a crash or a full disk; reused, or gc'd)."""
        return listing.blobs(self)

    def stray_temp_files(self) -> list[Path]:
        """Temp files of interrupted writes, and partial downloads (see `listing`)."""
        return listing.stray_temp_files(self)

    def verify_full(self, version: str) -> list[tuple[str, bool]]:
        """Re-hash every output of `version` against its record (slow): (name, whether its
        bytes match). A file that does not match loses its record (`check_content`)."""
        return [
            (o.name, self.check_content(version, o.name) in ("ok", "restated", "changed"))
            for o in self.outputs(version)
        ]


# -- validation -------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    # The caller validated it against docs/format.md §1; this guards the file system anyway
    # (lock and temp names add the version, <= 128, and ~20 more to a 255-byte limit).
    if (
        not name
        or "/" in name
        or "\0" in name
        or name.startswith(".")
        or len(name) > MAX_NAME_LENGTH
    ):
        raise ValueError(f"invalid output name {name!r}")


def _check_version(version: str) -> None:
    if not VERSION_RE.fullmatch(version):
        raise ValueError(f"invalid version {version!r}")


__all__ = [
    "UNVERIFIED",
    "BlobOpener",
    "BlobRequest",
    "CacheTrust",
    "FileLock",
    "OutputSpec",
    "RecordInfo",
    "Store",
    "temp_owner",
]
