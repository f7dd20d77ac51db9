"""Small JSON state under `refs/`: where a floating tag points, rollback state.

Read on the boot path: an unreadable, corrupt or odd file is a warning and None, never
an exception; writes are atomic and durable, and an OS error is a CacheError.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from exec_sandbox_assets.cache.files import (
    NotRegular,
    io_error,
    read_small,
    stat_key,
    write_small,
)

log = logging.getLogger("exec_sandbox_assets.cache.store")

# The key prefix of a floating tag's state (`tag-latest`): which release it last named.
FLOATING_REF_PREFIX = "tag-"


class Refs:
    """The files of `root` (the cache's `refs/`), one per plain key."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # Parsed state by key while the file's stat is unchanged (the boot path reads the
        # floating tag's ref several times per call).
        self._memo: dict[str, tuple[tuple[int, int, int, int], dict[str, Any]]] = {}
        self._paths: dict[str, Path] = {}

    def path(self, key: str) -> Path:
        known = self._paths.get(key)
        if known is not None:
            return known
        if (
            not key
            or key.startswith(".")
            or len(key.encode()) > 200
            or any(c in key for c in "/\\")
            or any(ord(c) < 32 or ord(c) == 127 for c in key)
        ):
            raise ValueError(f"invalid state key {key!r}: must be a plain file name")
        path = self._paths[key] = self.root / f"{key}.json"
        return path

    def read(self, key: str) -> dict[str, Any] | None:
        path = self.path(key)
        try:
            st = os.stat(str(path), follow_symlinks=False)  # noqa: PTH116 - the boot path
            memo = self._memo.get(key)
            if memo is not None and memo[0] == stat_key(st):
                return dict(memo[1])
            data = read_small(path)
        except FileNotFoundError:
            return None
        except (NotRegular, ValueError, OSError) as exc:
            log.warning(
                "ignoring unreadable state file", extra={"path": str(path), "error": str(exc)}
            )
            return None
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError) as exc:
            log.warning("ignoring corrupt state file", extra={"path": str(path), "error": str(exc)})
            return None
        if not isinstance(obj, dict):
            log.warning("ignoring state file that is not an object", extra={"path": str(path)})
            return None
        self._memo[key] = (stat_key(st), obj)
        return dict(obj)

    def write(self, key: str, data: dict[str, Any]) -> None:
        path = self.path(key)
        try:
            write_small(path, json.dumps(data, indent=2, sort_keys=True).encode() + b"\n")
        except OSError as exc:
            raise io_error(exc, "write", path) from exc


__all__ = ["Refs"]
