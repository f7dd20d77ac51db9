"""Upgrades that download only what changed (docs/format.md §9), before a full download.

Two ways, tried in order, each under the output lock `Store.ensure` takes:

1. `reuse`: the cache already holds the very content (same content digest) under another
   version (or 0.22.0's adopted copy): it is hashed once more, then hard-linked (else
   copied) into place and recorded. Nothing is downloaded.
2. `patch`: the layer names a patch from a content the cache holds (a record whose stat
   still matches). The patch blob is downloaded like any blob (`Store.fetch_blob`:
   resumable, single ranges, verified against its signed digest *before* a byte is
   decoded), decoded with the held file as reference (memory-mapped, output capped at the
   signed size, `release.patchcodec`), and the result checked against `content.digest`
   before the rename, exactly as a decompressed layer is (`cache.output.Output`).

Any failure of either way is one warning line saying why, and the caller downloads the
whole layer as before. A crash leaves a temp file the next install removes and, between
download and rename, the verified patch blob under `blobs/`, reused by the next run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from exec_sandbox_assets.base.errors import AssetError
from exec_sandbox_assets.base.fsutil import fsync_dir
from exec_sandbox_assets.cache.download import BlobOpener, BlobRequest
from exec_sandbox_assets.cache.files import file_mode, tmp_name, unlink
from exec_sandbox_assets.cache.legacy import place_file
from exec_sandbox_assets.cache.listing import file_digest
from exec_sandbox_assets.cache.output import Output, OutputSpec
from exec_sandbox_assets.cache.store import Store

if TYPE_CHECKING:  # the warm boot path imports this module, never these
    from exec_sandbox_assets.release.delta import Patch

log = logging.getLogger(__name__)

DOWNLOAD, PATCH, REUSE = "download", "patch", "reuse"


@dataclass(frozen=True)
class Obtained:
    """How one output got into the cache, and what it cost on the network."""

    how: str  # DOWNLOAD, PATCH, REUSE (or "cached": nothing to do)
    downloaded: int  # bytes transferred for it
    full: int  # bytes a full download takes (the layer size)


def held(store: Store, digest: str, *, skip_version: str | None = None) -> Path | None:
    """A cached output with content `digest` whose stat still matches its record."""
    for version in reversed(store.versions()):  # newest first: most likely still wanted
        if version == skip_version:
            continue
        for info in store.outputs(version):
            if info.valid and info.content_digest == digest:
                return info.path
    return None


async def reuse(store: Store, out: OutputSpec, found: Path) -> Path | None:
    """The output placed from `found`, another version's copy of the same content (what
    `held` found), else None."""
    async with store.output_lock(out.version, out.name):
        if (
            hit := store.lookup(out.version, out.name, content_digest=out.content_digest)
        ) is not None:
            return hit
        try:
            return await asyncio.to_thread(_reuse_sync, store, out, found)
        except (OSError, AssetError) as exc:
            _fall_back(out, f"reusing {found} failed ({exc})")
            return None


def _reuse_sync(store: Store, out: OutputSpec, found: Path) -> Path | None:
    # The record vouches for the stat, not the bytes: a new version's file is hashed.
    actual = file_digest(found, out.content_digest)
    if actual != out.content_digest:
        _fall_back(out, f"{found} no longer has content {out.content_digest} (has {actual})")
        return None
    final = store.output_path(out.version, out.name)
    place_file(found, final)
    if out.executable:
        final.chmod(final.stat().st_mode | 0o111)
    store.records.write(store.record_path(out.version, out.name), out, final.stat())
    log.info(
        "reused %s: the cache holds the same content (no download)",
        final,
        extra={"output": out.name, "from": str(found), "digest": out.content_digest},
    )
    return final


async def patch(
    store: Store,
    out: OutputSpec,
    patches: Sequence[Patch],
    opener: Callable[[Patch], BlobOpener],
    progress: Callable[[int], None] | None = None,
    rebuild: asyncio.Lock | None = None,
) -> tuple[Path, Patch | None] | None:
    """The output rebuilt from a held content and a downloaded patch, with the patch
    used (None: another process installed the output meanwhile), else None.

    `rebuild`, shared by the outputs of one fetch, lets one decode run at a time (the
    patch downloads still overlap): each holds a window as large as its file.
    """
    from exec_sandbox_assets.release.patchcodec import DeltaUnavailable, PatchError

    for candidate in patches:
        base = held(store, candidate.base_digest)
        if base is None:
            continue
        try:
            async with store.output_lock(out.version, out.name) as lock:
                hit = store.lookup(out.version, out.name, content_digest=out.content_digest)
                if hit is not None:
                    return hit, None
                if lock.locked:  # nobody else writes this output: temp files are a dead run's
                    await asyncio.to_thread(store.remove_dead_temps, out)
                blob = await _fetch_patch(store, out, candidate, opener, progress)
                async with rebuild or contextlib.nullcontext():
                    final = await asyncio.to_thread(_rebuild, store, out, base, blob)
        except (AssetError, OSError, PatchError, DeltaUnavailable) as exc:
            _fall_back(out, f"patch {candidate.digest} from {candidate.base_digest}: {exc}")
            return None
        return final, candidate
    return None


async def _fetch_patch(
    store: Store,
    out: OutputSpec,
    p: Patch,
    opener: Callable[[Patch], BlobOpener],
    progress: Callable[[int], None] | None,
) -> Path:
    req = BlobRequest(p.digest, p.size, out.source)
    async with store.blob_lock(p.digest):
        return await store.fetch_blob(req, opener(p), progress)


def _rebuild(store: Store, out: OutputSpec, base: Path, blob: Path) -> Path:
    """Decode `blob` against `base` into a temp file; verified, then renamed into place."""
    from exec_sandbox_assets.release.patchcodec import apply_patch

    final = store.output_path(out.version, out.name)
    tmp = tmp_name(final.parent, final.name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    output: Output | None = None
    try:
        output = Output(fd, out, tmp)
        with base.open("rb") as reference, blob.open("rb") as patch_file:
            apply_patch(reference, patch_file, output.write, out.content_size)
        output.finish()  # the content digest and size, before the file gets its name
        os.fchmod(fd, file_mode(out.executable))
        os.fsync(fd)
        st = os.fstat(fd)
        tmp.replace(final)
    except BaseException:
        if output is not None:
            with contextlib.suppress(BaseException):
                output.close()  # its thread must be done with fd before it is closed
        os.close(fd)
        unlink(tmp)
        raise
    os.close(fd)
    fsync_dir(final.parent)
    store.records.write(store.record_path(out.version, out.name), out, st)
    unlink(blob)  # the output is what is kept; the patch served its purpose
    log.info(
        "rebuilt %s from %s and a patch",
        final,
        extra={"output": out.name, "base": str(base), "digest": out.content_digest},
    )
    return final


def _fall_back(out: OutputSpec, why: str) -> None:
    log.warning("%s: no delta (%s); downloading the full file", out.name, why)


__all__ = ["DOWNLOAD", "PATCH", "REUSE", "Obtained", "held", "patch", "reuse"]
