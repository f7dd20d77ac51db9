"""Free space, checked before the first byte of a download.

The signed sizes say what a pull will write: each file's decompressed size, plus what is
left of its compressed download (a `.partial` beside it until the install). `plan`
(pure) compares that with the free space of the cache's file system minus a margin that
is kept free for everything else on it (EXEC_SANDBOX_MIN_FREE). When not everything
fits, the files that fit are fetched smallest first and only the others are refused:
the kernels and gvproxy are not lost to a base image that could never fit, and nothing
of a refused file is written. A refused file is an `OutOfSpaceError` naming what it
needs, what is free, and where.

The needs are upper bounds: zero runs of a base image become holes, so it may take less
than its size. `free_bytes` and `need_of` are the I/O edges (statvfs, stat).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from exec_sandbox_assets.base.errors import OutOfSpaceError
from exec_sandbox_assets.base.sizes import describe_size

if TYPE_CHECKING:
    from exec_sandbox_assets.cache.store import Store
    from exec_sandbox_assets.release.documents import AssetLayer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Need:
    name: str  # the output name
    size: int  # bytes the download and install write, at most


@dataclass(frozen=True)
class SpacePlan:
    where: Path  # the cache directory (its file system is what was measured)
    free: int  # bytes available to this user there
    margin: int  # bytes to leave free (EXEC_SANDBOX_MIN_FREE)
    needs: tuple[Need, ...]
    refused: tuple[str, ...]  # names that do not fit, largest last

    @property
    def total(self) -> int:
        return sum(n.size for n in self.needs)

    def error(self, name: str) -> OutOfSpaceError:
        """Why `name` was refused, with the numbers to act on."""
        need = next(n.size for n in self.needs if n.name == name)
        fitted = sum(n.size for n in self.needs if n.name not in self.refused)
        left = max(0, self.free - self.margin - fitted)
        kept = (
            f"{describe_size(self.margin)} kept free by EXEC_SANDBOX_MIN_FREE; "
            if self.margin
            else ""
        )
        return OutOfSpaceError(
            f"not enough space in {self.where} for {name}: it needs up to "
            f"{describe_size(need)} and {describe_size(self.free)} are free there ({kept}"
            f"{describe_size(left)} left after the {len(self.needs) - len(self.refused)} "
            f"file(s) that fit; all {len(self.needs)} need {describe_size(self.total)}). "
            "Nothing of it was downloaded: free space (exec-sandbox-assets gc; gc --partials "
            "also removes resumable downloads), point EXEC_SANDBOX_CACHE_DIR elsewhere"
            + (", or lower EXEC_SANDBOX_MIN_FREE" if self.margin else "")
        )


def plan(needs: Sequence[Need], free: int, margin: int, where: Path) -> SpacePlan:
    """Which of `needs` fit in `free` bytes minus `margin`: all of them, else as many as
    fit taken smallest first (ties by name); the rest are refused."""
    budget = free - margin
    refused: list[str] = []
    if sum(n.size for n in needs) > budget:
        for need in sorted(needs, key=lambda n: (n.size, n.name)):
            if need.size == 0 or need.size <= budget:
                budget -= need.size
            else:
                refused.append(need.name)
    return SpacePlan(where, free, margin, tuple(needs), tuple(refused))


# -- I/O edges ---------------------------------------------------------------------------------


def free_bytes(path: Path) -> tuple[Path, int]:
    """(the nearest existing directory at or above `path`, bytes free there for this user)."""
    where = Path(path)
    while not where.exists() and where.parent != where:
        where = where.parent
    st = os.statvfs(where)
    return where, st.f_bavail * st.f_frsize


def need_of(name: str, blob: Path, layer_size: int, content_size: int, compressed: bool) -> Need:
    """What installing `name` still writes: what is left of its download (a partial or a
    complete blob already on disk counts), plus the decompressed file when compressed
    (an uncompressed blob becomes the file by a rename)."""
    have = 0
    if blob.exists():
        have = layer_size
    else:
        try:
            st = blob.with_name(blob.name + ".partial").stat()
        except OSError:
            pass
        else:
            # Ranged downloads leave holes: only allocated bytes are there already.
            have = min(st.st_size, st.st_blocks * 512, layer_size)
    left = max(0, layer_size - have)
    return Need(name, left + (content_size if compressed else 0))


def plan_downloads(
    store: Store, layers: Sequence[tuple[str, AssetLayer]], margin: int
) -> SpacePlan | None:
    """What downloading `layers` (output name, layer) into `store` needs against its free
    space; None where free space cannot be measured."""
    needs = [
        need_of(
            name,
            store.blob_path(layer.digest),
            layer.size,
            layer.content_size,
            layer.compressed,
        )
        for name, layer in layers
    ]
    try:
        _, free = free_bytes(store.root)
    except OSError as exc:
        log.debug("free space unknown", extra={"path": str(store.root), "error": str(exc)})
        return None
    return plan(needs, free, margin, store.root)


__all__ = ["Need", "SpacePlan", "free_bytes", "need_of", "plan", "plan_downloads"]
