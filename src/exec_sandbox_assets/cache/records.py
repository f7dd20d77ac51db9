"""Verification records: what the warm path compares a cached file against.

`v<version>/.verified/<name>.json` holds the digests, the file's stat when it was
verified (size, mtime, inode), where it came from, what admitted it (the ids of the
trusted keys whose signatures verified its release, or "unverified": a run with
verification skipped) and when its bytes were last hashed against the content digest
(`content_checked_at`; absent in older records, whose last check is `verified_at`).
`CacheTrust` says which records the current settings accept.

A record whose file fails a content check is removed (`RecordBook.invalidate`): the file
is then a cache miss and the next pull or boot fetches it again.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from exec_sandbox_assets.cache.files import NotRegular, read_small, stat_key, unlink, write_small
from exec_sandbox_assets.cache.install import OutputSpec

log = logging.getLogger("exec_sandbox_assets.cache.store")

RECORD_FORMAT = 1
UNVERIFIED = "unverified"
# What admitted a file of an exec-sandbox <= 0.22.0 GitHub release (no signature: TLS and
# the GitHub API digest), served only while EXEC_SANDBOX_ALLOW_LEGACY_RELEASES is set.
LEGACY_GITHUB_DIGEST = "legacy-github-digest"

_T = TypeVar("_T")


@dataclass(frozen=True)
class CacheTrust:
    """Which records the warm path may serve: those admitted by at least `threshold` of
    `key_ids` (the trusted keys now), legacy-release files while `legacy` is allowed, or
    any record when verification is skipped."""

    key_ids: frozenset[str] = frozenset()
    threshold: int = 1
    insecure: bool = False
    legacy: bool = False

    def admits(self, verified_by: tuple[str, ...] | None) -> bool:
        if self.insecure:
            return True
        if not verified_by:  # unverified, or a record older than this field
            return False
        if verified_by == (LEGACY_GITHUB_DIGEST,):
            return self.legacy
        return len(self.key_ids.intersection(verified_by)) >= self.threshold


@dataclass(frozen=True)
class Record:
    content_digest: str
    size: int
    mtime_ns: int
    ino: int
    layer_digest: str
    source: str
    verified_at: str
    verified_by: tuple[str, ...] | None  # key ids; () = unverified; None = not recorded
    content_checked_at: str | None = None  # last hash of the bytes (None: at verified_at)

    @classmethod
    def from_bytes(cls, data: bytes) -> Record:
        obj = json.loads(data)
        if not isinstance(obj, dict) or obj.get("format") != RECORD_FORMAT:
            raise ValueError("not a record of a known format")
        by = obj.get("verified_by")
        verified_by: tuple[str, ...] | None = None
        if by == UNVERIFIED:
            verified_by = ()
        elif isinstance(by, list) and all(isinstance(k, str) for k in by):
            verified_by = tuple(by)
        checked = obj.get("content_checked_at")
        return cls(
            content_digest=_field(obj, "content_digest", str),
            size=_field(obj, "size", int),
            mtime_ns=_field(obj, "mtime_ns", int),
            ino=_field(obj, "ino", int),
            layer_digest=_field(obj, "layer_digest", str),
            source=_field(obj, "source", str),
            verified_at=_field(obj, "verified_at", str),
            verified_by=verified_by,
            content_checked_at=checked if isinstance(checked, str) else None,
        )

    def last_content_check(self) -> datetime | None:
        """When the file's bytes were last hashed (None: an unreadable time)."""
        try:
            when = datetime.fromisoformat(self.content_checked_at or self.verified_at)
        except ValueError:
            return None
        return when if when.tzinfo is not None else when.replace(tzinfo=UTC)

    def matches(self, st: os.stat_result) -> bool:
        return (
            stat.S_ISREG(st.st_mode)
            and st.st_size == self.size
            and st.st_mtime_ns == self.mtime_ns
            and st.st_ino == self.ino
        )


def _field(obj: dict[str, Any], key: str, kind: type[_T]) -> _T:
    value = obj.get(key)
    # `type() is` so that a bool is not taken for an int.
    if type(value) is not kind:
        raise ValueError(f"record field {key!r} must be {kind.__name__}")
    return value


class RecordBook:
    """Reads and writes records. Parsed records are kept by path while the record
    file's stat is unchanged: a warm lookup is then two stats, no open, read or parse."""

    def __init__(self) -> None:
        self._memo: dict[str, tuple[tuple[int, int, int, int], Record]] = {}

    def read(self, path: str) -> Record | None:
        try:
            st = os.stat(path, follow_symlinks=False)  # noqa: PTH116 - the boot path: a str
            memo = self._memo.get(path)
            if memo is not None and memo[0] == stat_key(st):
                return memo[1]
            record = Record.from_bytes(read_small(Path(path)))
        except FileNotFoundError:
            log.debug("no verification record", extra={"path": path})
            return None
        # ValueError covers JSONDecodeError and UnicodeDecodeError; deep nesting recurses.
        except (OSError, ValueError, RecursionError, NotRegular) as exc:
            log.debug("unreadable verification record", extra={"path": path, "error": str(exc)})
            return None
        self._memo[path] = (stat_key(st), record)
        return record

    def invalidate(self, path: Path) -> None:
        """Remove a record whose file failed a content check: the file is then a cache
        miss, fetched again by the next pull or boot."""
        unlink(path)
        self._memo.pop(str(path), None)

    def update(self, path: Path, st: os.stat_result | None = None) -> None:
        """Record a content check that matched, now; with `st`, the file's new stat too
        (its bytes were hashed and still match: touched or copied back, not changed)."""
        obj = json.loads(read_small(path))
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: not a record")
        obj["content_checked_at"] = _now()
        if st is not None:
            obj.update(size=st.st_size, mtime_ns=st.st_mtime_ns, ino=st.st_ino)
        write_small(path, json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n")

    @staticmethod
    def write(path: Path, out: OutputSpec, st: os.stat_result) -> None:
        now = _now()
        record = {
            "format": RECORD_FORMAT,
            "version": out.version,
            "name": out.name,
            "content_digest": out.content_digest,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "ino": st.st_ino,
            "layer_digest": out.layer_digest,
            "source": out.source,
            "verified_at": now,
            "content_checked_at": now,  # installing hashed every byte
            "verified_by": list(out.verified_by) if out.verified_by else UNVERIFIED,
        }
        write_small(path, json.dumps(record, indent=2, sort_keys=True).encode() + b"\n")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


__all__ = ["UNVERIFIED", "CacheTrust", "Record", "RecordBook"]
