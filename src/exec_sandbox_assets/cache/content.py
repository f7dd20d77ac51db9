"""Content checks: hash a cached file against the digest its record names.

The warm path trusts a file whose stat matches its record; bit rot or an in-place edit
that keeps size and mtime slips past that. A content check reads every byte. On a
mismatch the record is removed, so the file is a cache miss from then on and the next
pull or boot fetches it again (`verify --full`, `verify --repair`, `pull --force`, and
the boot path with EXEC_SANDBOX_VERIFY_CONTENT_AFTER set). On a match the record gets
the time of the check (`content_checked_at`), which the boot-path setting compares with.

A record is removed only while it still describes exactly the bytes that were hashed
(same inode, size, mtime): a writer that installed a good file meanwhile keeps its
record. No lock is needed for that; at worst a race costs one more download.
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

from exec_sandbox_assets.cache.files import NotRegular, digest_of, hash_fd, open_file
from exec_sandbox_assets.oci.model import new_hasher

if TYPE_CHECKING:  # the store delegates here; no import cycle at run time
    from exec_sandbox_assets.cache.records import Record
    from exec_sandbox_assets.cache.store import Store

log = logging.getLogger("exec_sandbox_assets.cache.store")

#: ok: the bytes match (check time recorded); restated: they match, and the record now
#: has the file's new stat (touched or copied back); changed: they match but the stat
#: differs (the next use re-installs it); mismatch: they do not (record removed);
#: missing: no file; unrecorded: no record to check against.
ContentState = Literal["ok", "restated", "changed", "mismatch", "missing", "unrecorded"]


def check_content(store: Store, version: str, name: str, *, restat: bool = False) -> ContentState:
    """Hash the cached `name` of `version` against its record (see the module docstring).

    `restat`: when the bytes match but the stat changed, record the new stat instead of
    leaving the file to be re-installed.
    """
    path = store.output_path(version, name)
    record_path = store.record_path(version, name)
    record = store.records.read(str(record_path))
    if record is None:
        return "unrecorded"
    try:
        fd = open_file(path)
    except (OSError, NotRegular):
        return "missing"
    try:
        st = os.fstat(fd)
        hasher = new_hasher(record.content_digest)
        hash_fd(fd, hasher, st.st_size, threading.Event())
    finally:
        os.close(fd)
    actual = digest_of(hasher, record.content_digest)
    # The record may have been rewritten while we hashed (another writer installed it).
    now = store.records.read(str(record_path))
    describes = now is not None and now.content_digest == record.content_digest and now.matches(st)
    if actual != record.content_digest:
        log.warning(
            "cached file does not match its digest (modified or corrupt); it will be fetched again",
            extra={"path": str(path), "expected": record.content_digest, "actual": actual},
        )
        if describes:
            # The file stays until the download replaces it, so `verify` keeps naming it.
            store.records.invalidate(record_path)  # an OSError: the caller must not serve it
        return "mismatch"
    if describes:
        try:
            store.records.update(record_path)
        except (OSError, ValueError) as exc:
            # A read-only cache: the bytes match, which is what matters; the time is lost.
            log.debug("content check not recorded", extra={"path": str(path), "error": str(exc)})
        return "ok"
    if restat and now is not None and now.content_digest == record.content_digest:
        try:
            same = os.path.samestat(path.stat(), st)
        except OSError:
            same = False
        if same:
            store.records.update(record_path, st)
            return "restated"
    return "changed"


def due(record: Record, max_age: float, now: datetime | None = None) -> bool:
    """Whether `record`'s file was last hashed `max_age` seconds ago or more."""
    last = record.last_content_check()
    if last is None:
        return True
    return ((now or datetime.now(UTC)) - last).total_seconds() >= max_age


__all__ = ["ContentState", "check_content", "due"]
