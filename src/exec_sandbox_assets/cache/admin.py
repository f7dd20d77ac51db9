"""Cache administration for `status`, `verify` and `gc`: a listing, a pure plan, a thin edge.

    scan(store)                    -> CacheListing   (I/O: directory listings and stats)
    plan_gc(listing, keep, ...)    -> GcPlan         (pure: what to delete, and why)
    run_gc(store, plan, dry_run)   -> GcReport       (I/O: take locks, delete, or only check)

`run_gc` takes the same locks a download takes (`Store.output_lock`, `Store.blob_lock`),
without waiting: what another process holds is skipped, never deleted under it. A dry run
takes and releases the locks too, so it reports exactly what a real run would do on an
unchanged cache.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from exec_sandbox_assets.cache.download import ranges_path
from exec_sandbox_assets.cache.refs import FLOATING_REF_PREFIX
from exec_sandbox_assets.cache.store import RecordInfo, Store, temp_owner
from exec_sandbox_assets.oci.model import is_digest

# Writers of small state files (refs/) hold no lock; their temp files live milliseconds.
STATE_TEMP_MIN_AGE = 3600.0

ItemKind = Literal["version", "blob", "partial", "temp"]


@dataclass(frozen=True)
class FileEntry:
    path: Path
    size: int
    mtime: float


@dataclass(frozen=True)
class VersionListing:
    version: str
    path: Path
    size: int  # every regular file under the directory (records and temp files too)
    outputs: tuple[RecordInfo, ...]
    temps: tuple[FileEntry, ...]  # temp files of interrupted installs inside the directory


@dataclass(frozen=True)
class CacheListing:
    root: Path
    versions: tuple[VersionListing, ...]  # oldest first
    floating: dict[str, str]  # floating tag -> version its ref points to
    partials: tuple[FileEntry, ...]
    blobs: tuple[FileEntry, ...]  # complete blobs not yet installed (left by a crash)
    state_temps: tuple[FileEntry, ...]  # temp files in refs/

    @property
    def total_size(self) -> int:
        return sum(v.size for v in self.versions) + sum(
            e.size for e in (*self.partials, *self.blobs, *self.state_temps)
        )


# -- scan (I/O) ------------------------------------------------------------------------------


def _entry(path: Path) -> FileEntry | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return FileEntry(path, st.st_size, st.st_mtime)


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += (Path(dirpath) / name).lstat().st_size
    return total


def floating_refs(store: Store) -> dict[str, str]:
    """Floating tag -> cached version, from the refs the client writes (`tag-latest`)."""
    refs: dict[str, str] = {}
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(store.root / "refs"):
            name = entry.name
            if not name.startswith(FLOATING_REF_PREFIX) or not name.endswith(".json"):
                continue
            key = name.removesuffix(".json")
            try:
                state = store.read_state(key)
            except ValueError:
                continue
            version = state.get("version") if state else None
            if isinstance(version, str):
                refs[key.removeprefix(FLOATING_REF_PREFIX)] = version
    return refs


def scan(store: Store) -> CacheListing:
    """Everything in the cache that `status` shows and `gc` may delete."""
    temps = store.stray_temp_files()
    versions = []
    for version in store.versions():
        vdir = store.version_dir(version)
        inside = [e for p in temps if p.is_relative_to(vdir) and (e := _entry(p)) is not None]
        versions.append(
            VersionListing(
                version, vdir, _tree_size(vdir), tuple(store.outputs(version)), tuple(inside)
            )
        )
    refs_dir = store.root / "refs"
    state_temps = [e for p in temps if p.parent == refs_dir and (e := _entry(p)) is not None]
    partials = [e for p, _ in store.partials() if (e := _entry(p)) is not None]
    blobs = [e for p, _ in store.blobs() if (e := _entry(p)) is not None]
    return CacheListing(
        store.root,
        tuple(versions),
        floating_refs(store),
        tuple(partials),
        tuple(blobs),
        tuple(state_temps),
    )


# -- gc plan (pure) --------------------------------------------------------------------------


@dataclass(frozen=True)
class LockRef:
    """A store lock: ("output", version, name) or ("blob", digest, "")."""

    kind: Literal["output", "blob"]
    key: str
    name: str = ""


@dataclass(frozen=True)
class GcItem:
    kind: ItemKind
    path: Path
    size: int
    reason: str
    locks: tuple[LockRef, ...] = ()


@dataclass(frozen=True)
class GcPlan:
    items: tuple[GcItem, ...]
    kept_versions: tuple[str, ...]
    resumable: tuple[FileEntry, ...] = ()  # downloads kept for the next pull (no --partials)

    @property
    def total(self) -> int:
        return sum(i.size for i in self.items)


def blob_digest(path: Path) -> str | None:
    """`blobs/sha256/<hex>[.partial]` -> `sha256:<hex>` (None for anything else)."""
    digest = f"{path.parent.name}:{path.name.removesuffix('.partial')}"
    return digest if is_digest(digest) else None


def versions_to_keep(
    versions: Sequence[str], keep: int, protected: Sequence[str] = ()
) -> tuple[str, ...]:
    """The newest `keep` of `versions` (given oldest first) plus every protected one present."""
    newest = list(versions[len(versions) - keep :]) if keep > 0 else []
    return tuple(v for v in versions if v in newest or v in protected)


def _blob_locks(path: Path) -> tuple[LockRef, ...]:
    digest = blob_digest(path)
    return (LockRef("blob", digest),) if digest else ()


def plan_gc(
    listing: CacheListing,
    *,
    keep: int = 1,
    protected: Sequence[str] = (),
    partials: bool = False,
    now: float,
    state_temp_min_age: float = STATE_TEMP_MIN_AGE,
) -> GcPlan:
    """What `gc` removes: versions beyond the newest `keep` (floating refs' versions and
    `protected` ones are kept) and temp files of interrupted writes; with `partials`,
    resumable downloads too (partials, and complete blobs never installed, which a full
    disk or a crash left and the next pull reuses). Without it they are kept and listed
    in `GcPlan.resumable`. Items are in a stable order (by kind, then path)."""
    if keep < 0:
        raise ValueError(f"keep must be >= 0, not {keep}")
    protect = (*protected, *listing.floating.values())
    kept = versions_to_keep([v.version for v in listing.versions], keep, protect)
    items: list[GcItem] = []
    for v in listing.versions:
        if v.version in kept:
            for t in v.temps:
                name = temp_owner(t.path)
                locks = (LockRef("output", v.version, name),) if name else ()
                items.append(
                    GcItem("temp", t.path, t.size, "temp file of an interrupted write", locks)
                )
            continue
        names = sorted(
            {o.name for o in v.outputs} | {n for t in v.temps if (n := temp_owner(t.path))}
        )
        why = "old version" + (f" (keeping {', '.join(kept)})" if kept else "")
        items.append(
            GcItem(
                "version",
                v.path,
                v.size,
                why,
                tuple(LockRef("output", v.version, n) for n in names),
            )
        )
    if partials:
        for b in listing.blobs:
            why = "downloaded blob never installed (resumable)"
            items.append(GcItem("blob", b.path, b.size, why, _blob_locks(b.path)))
        for p in listing.partials:
            why = "partial download (resumable)"
            items.append(GcItem("partial", p.path, p.size, why, _blob_locks(p.path)))
    for t in listing.state_temps:
        if now - t.mtime >= state_temp_min_age:
            items.append(GcItem("temp", t.path, t.size, "temp file of an interrupted write"))
    order = {"version": 0, "blob": 1, "partial": 2, "temp": 3}
    items.sort(key=lambda i: (order[i.kind], str(i.path)))
    resumable = () if partials else (*listing.blobs, *listing.partials)
    return GcPlan(tuple(items), kept, tuple(sorted(resumable, key=lambda e: str(e.path))))


# -- gc run (I/O edge) -----------------------------------------------------------------------


@dataclass(frozen=True)
class GcOutcome:
    item: GcItem
    removed: bool  # removed (or, in a dry run, would be)
    skipped: str = ""  # why not, when not


@dataclass(frozen=True)
class GcReport:
    dry_run: bool
    outcomes: tuple[GcOutcome, ...]
    kept_versions: tuple[str, ...] = ()
    resumable: tuple[FileEntry, ...] = ()  # kept for the next pull (gc --partials frees them)

    @property
    def freed(self) -> int:
        return sum(o.item.size for o in self.outcomes if o.removed)


def _lock_path(store: Store, lock: LockRef) -> Path:
    if lock.kind == "blob":
        return store.blob_lock(lock.key).path
    return store.output_lock(lock.key, lock.name).path


@contextlib.contextmanager
def _try_locks(paths: Sequence[Path]) -> Iterator[bool]:
    """Hold every lock in `paths` without waiting; yields False if any is held elsewhere.

    Unlike `FileLock`, this never proceeds unlocked: where locking is unsupported, or
    another process holds a lock, nothing is deleted.
    """
    fds: list[int] = []
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if isinstance(exc, BlockingIOError) or exc.errno in (
                    errno.EAGAIN,
                    errno.ENOLCK,
                    errno.EOPNOTSUPP,
                ):
                    yield False
                    return
                raise
        yield True
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        if path.name.endswith(".partial"):  # its range progress goes with it
            with contextlib.suppress(FileNotFoundError):
                ranges_path(path).unlink()


def run_gc(store: Store, plan: GcPlan, *, dry_run: bool) -> GcReport:
    """Delete (or, with `dry_run`, only check) every item of `plan` whose locks are free."""
    outcomes = []
    for item in plan.items:
        with _try_locks([_lock_path(store, lock) for lock in item.locks]) as free:
            if not free:
                outcomes.append(GcOutcome(item, False, "in use by another process"))
                continue
            if not item.path.exists():
                outcomes.append(GcOutcome(item, False, "already gone"))
                continue
            if not dry_run:
                _remove(item.path)
            outcomes.append(GcOutcome(item, True))
    return GcReport(dry_run, tuple(outcomes), plan.kept_versions, plan.resumable)


# -- verify ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyResult:
    version: str
    name: str
    path: Path
    ok: bool
    problem: str = ""
    note: str = ""


def verify_version(
    store: Store, version: str, *, full: bool, restat: bool = False
) -> list[VerifyResult]:
    """Check each output of `version`.

    Default: its stat against its verification record, the check a boot makes. With
    `full`: its content digest (every byte is read, `Store.check_content`); a file that
    does not match loses its record, so the next pull or boot fetches it again. A file
    whose bytes still match but whose stat changed (touched, copied back) passes, with a
    note that the next use re-installs it, or (`restat`) with its new stat recorded.
    """
    results = []
    for info in store.outputs(version):
        problem = note = ""
        if not info.content_digest:
            problem = "no verification record (never verified; the next use fetches it)"
        elif not info.path.is_file():
            problem = "file missing"
        elif full:
            state = store.check_content(version, info.name, restat=restat)
            if state == "mismatch":
                problem = (
                    f"content does not match {info.content_digest} (modified or corrupt); "
                    "its record is removed, so the next pull or boot fetches it again"
                )
            elif state == "changed":
                note = "content intact, but its stat changed: the next use re-installs it"
            elif state == "restated":
                note = "content intact; its stat had changed and is now recorded"
            elif state != "ok":
                problem = "file missing" if state == "missing" else "no verification record"
        elif not info.valid:
            problem = "changed since it was verified (size, mtime or inode differ)"
        results.append(VerifyResult(version, info.name, info.path, not problem, problem, note))
    return results


__all__ = [
    "CacheListing",
    "FileEntry",
    "GcItem",
    "GcOutcome",
    "GcPlan",
    "GcReport",
    "LockRef",
    "VerifyResult",
    "VersionListing",
    "blob_digest",
    "floating_refs",
    "plan_gc",
    "run_gc",
    "scan",
    "verify_version",
    "versions_to_keep",
]
