"""Files exec-sandbox <= 0.22.0 left behind: adopted by hash, never trusted by name.

0.22.0 downloaded into `~/.cache/exec-sandbox/v{version}/` (or flat into
`$EXEC_SANDBOX_CACHE_DIR`) and later trusted whatever file it found there. The store trusts
a file only through its verification record, so such a file is a cache miss. Rather than
download it again, `adopt` hashes it against the signed release's content digest: a match
is linked (or copied) into the store's version directory and recorded as verified, so the
next boot is a stat; a mismatch is left alone and the store downloads the real file.

Offline there is no signed digest to compare with; `find_unverified` then returns the file
as 0.22.0 used it, and the caller warns once that it is unverified (docs/compat.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path

from exec_sandbox_assets.base.fsutil import fsync_dir
from exec_sandbox_assets.cache.files import make_dirs, tmp_name
from exec_sandbox_assets.cache.listing import file_digest
from exec_sandbox_assets.cache.store import OutputSpec, Store

log = logging.getLogger(__name__)


def candidates(store: Store, version: str, name: str, legacy_dirs: Iterable[Path]) -> list[Path]:
    """Where a 0.22.0 copy of `name` may be: in place, then each legacy directory."""
    paths = [store.output_path(version, name), *(Path(d) / name for d in legacy_dirs)]
    return list(dict.fromkeys(paths))


def _regular_size(path: Path) -> int | None:
    try:
        st = path.lstat()  # a symlink is not something 0.22.0 wrote: never followed
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _place(source: Path, final: Path) -> None:
    """Put `source` at `final` atomically: a hard link when possible, else a copy; the
    directory is made as the store makes its own (never group/world-writable)."""
    make_dirs(final.parent)
    tmp = tmp_name(final.parent, final.name)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
    tmp.replace(final)
    fsync_dir(final.parent)


def _adopt_sync(store: Store, out: OutputSpec, legacy_dirs: tuple[Path, ...]) -> Path | None:
    final = store.output_path(out.version, out.name)
    for path in candidates(store, out.version, out.name, legacy_dirs):
        if _regular_size(path) != out.content_size:
            continue  # cheap first check: a wrong size cannot match the digest
        actual = file_digest(path, out.content_digest)
        if actual != out.content_digest:
            log.info(
                "legacy cache file does not match the signed release; not using it",
                extra={"path": str(path), "expected": out.content_digest, "actual": actual},
            )
            continue
        if path != final:
            _place(path, final)
        if out.executable:
            final.chmod(final.stat().st_mode | 0o111)
        # The record is the store's own format: written by the store, for the store's lookup.
        store.records.write(store.record_path(out.version, out.name), out, final.stat())
        log.info(
            "adopted a file left by exec-sandbox <= 0.22.0 (its digest matches the signed release)",
            extra={"path": str(path), "output": str(final), "digest": out.content_digest},
        )
        return final
    return None


def has_candidate(store: Store, out: OutputSpec, legacy_dirs: tuple[Path, ...]) -> bool:
    """Whether `adopt` has a file to look at (a stat or two, no hashing)."""
    return _regular_size(store.output_path(out.version, out.name)) is not None or any(
        _regular_size(Path(d) / out.name) is not None for d in legacy_dirs
    )


async def adopt(store: Store, out: OutputSpec, legacy_dirs: tuple[Path, ...]) -> Path | None:
    """The verified output if a legacy copy of it hashes to `out.content_digest`, else None.

    Holds the store's output lock, so a concurrent `ensure` of the same file waits and then
    finds the record. Never raises for a legacy file it cannot read: that is just a miss.
    """
    if not has_candidate(store, out, legacy_dirs):
        return None
    try:
        # The lock file too: on a read-only cache its creation fails (then the download
        # path reports the cache as unusable, as a CacheError naming it).
        async with store.output_lock(out.version, out.name):
            if (
                hit := store.lookup(out.version, out.name, content_digest=out.content_digest)
            ) is not None:
                return hit
            return await asyncio.to_thread(_adopt_sync, store, out, legacy_dirs)
    except OSError as exc:
        log.warning(
            "could not adopt a legacy cache file; downloading instead",
            extra={"output": out.name, "error": str(exc)},
        )
        return None


def find_unverified(dirs: Iterable[Path], name: str) -> Path | None:
    """The first regular file `name` in `dirs` (0.22.0's trust: it exists)."""
    for directory in dirs:
        path = Path(directory) / name
        if _regular_size(path) is not None:
            return path
    return None


__all__ = ["adopt", "candidates", "find_unverified", "has_candidate"]
