"""What the cache holds, for `status`, `verify` and `gc` (`admin`): versions, outputs with
their records, partial downloads, leftover blobs and temp files. Read-only."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from exec_sandbox_assets.base.fsutil import CHUNK
from exec_sandbox_assets.cache.files import TMP_MARK, digest_of
from exec_sandbox_assets.oci.model import new_hasher

if TYPE_CHECKING:  # the store delegates here; no import cycle at run time
    from exec_sandbox_assets.cache.store import Store

VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_PARTIAL_SUFFIXES = (".partial", ".partial.ranges")


@dataclass(frozen=True)
class RecordInfo:
    """What `status` shows for one output of a version."""

    name: str
    path: Path
    size: int
    content_digest: str
    layer_digest: str
    source: str
    verified_at: str
    valid: bool  # the file's stat matches its record (what `lookup` checks)


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"[.+-]", version)
    )


def versions(store: Store) -> list[str]:
    try:
        entries = list(os.scandir(store.root))
    except FileNotFoundError:
        return []
    found = [
        e.name[1:]
        for e in entries
        if e.name.startswith("v") and VERSION_RE.fullmatch(e.name[1:]) and e.is_dir()
    ]
    return sorted(found, key=version_key)


def outputs(store: Store, version: str) -> list[RecordInfo]:
    vdir = store.version_dir(version)
    names: set[str] = set()
    with contextlib.suppress(FileNotFoundError):
        names.update(e.name for e in os.scandir(vdir) if not e.name.startswith(".") and e.is_file())
    with contextlib.suppress(FileNotFoundError):
        names.update(
            e.name.removesuffix(".json")
            for e in os.scandir(vdir / ".verified")
            if e.name.endswith(".json") and not e.name.startswith(".")
        )
    infos = []
    for name in sorted(names):
        path = vdir / name
        record = store.read_record(version, name)
        if record is None:
            try:
                size = path.stat().st_size
            except OSError:
                size = 0
            infos.append(RecordInfo(name, path, size, "", "", "", "", False))
        else:
            try:
                valid = record.matches(path.stat())  # intact; trust is `lookup`'s business
            except OSError:
                valid = False
            infos.append(
                RecordInfo(
                    name,
                    path,
                    record.size,
                    record.content_digest,
                    record.layer_digest,
                    record.source,
                    record.verified_at,
                    valid,
                )
            )
    return infos


def partials(store: Store) -> list[tuple[Path, int]]:
    return [
        (p, size)
        for p, size in _blob_files(store)
        if p.name.endswith(".partial") and TMP_MARK not in p.name
    ]


def blobs(store: Store) -> list[tuple[Path, int]]:
    return [(p, size) for p, size in _blob_files(store) if "." not in p.name]


def stray_temp_files(store: Store) -> list[Path]:
    """Temp files of interrupted writes, and partial downloads (with their range files).

    A running writer has some too: delete them only while holding the matching lock,
    or when they are old.
    """
    found: list[Path] = []
    dirs = [store.root / "refs"]
    for version in versions(store):
        vdir = store.version_dir(version)
        dirs += [vdir, vdir / ".verified"]
    for d in dirs:
        with contextlib.suppress(FileNotFoundError):
            found += [
                Path(e.path) for e in os.scandir(d) if e.name.startswith(".") and TMP_MARK in e.name
            ]
    found += [p for p, _ in _blob_files(store) if p.name.endswith(_PARTIAL_SUFFIXES)]
    return sorted(found)


def file_digest(path: Path, like: str) -> str:
    hasher = new_hasher(like)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
    return digest_of(hasher, like)


def _blob_files(store: Store) -> Iterator[tuple[Path, int]]:
    root = store.root / "blobs"
    try:
        algos = [e for e in os.scandir(root) if e.is_dir()]
    except FileNotFoundError:
        return
    for algo in algos:
        for e in os.scandir(algo.path):
            with contextlib.suppress(FileNotFoundError):
                if e.is_file():
                    yield Path(e.path), e.stat().st_size
