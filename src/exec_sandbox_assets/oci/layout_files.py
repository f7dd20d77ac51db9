"""The names and rules of an OCI image layout (image-spec `image-layout.md`), shared by
its reader (`oci.layout`), its writer (`oci.layout_writer`) and archives (`oci.archive`).

A layout is `oci-layout` (`{"imageLayoutVersion":"1.0.0"}`), `index.json` and
`blobs/<alg>/<hex>`. Tags are `index.json` entries annotated with
`org.opencontainers.image.ref.name`, as skopeo and oras write them. Here: those names,
the one mapping of a digest to its path (never anything that leaves `blobs/`), the
parsers of `oci-layout` and `index.json`, and the safe way to open a file of a layout
(regular files only, capped).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from exec_sandbox_assets.base import safejson
from exec_sandbox_assets.base.errors import (
    ConfigError,
    FormatError,
    OutOfSpaceError,
    SizeLimitError,
)
from exec_sandbox_assets.base.fsutil import CHUNK as CHUNK
from exec_sandbox_assets.base.fsutil import NotRegularFileError, out_of_space
from exec_sandbox_assets.base.fsutil import open_regular as _fs_open_regular
from exec_sandbox_assets.oci.model import MAX_MANIFEST_SIZE, Index, check_digest
from exec_sandbox_assets.oci.reference import TAG_RE

log = logging.getLogger("exec_sandbox_assets.oci.layout")

REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
LEGACY_LOCK_FILE = "index.json.lock"  # what earlier versions left in a layout
BLOBS_DIR = "blobs"
OCI_LAYOUT_BYTES = b'{"imageLayoutVersion":"1.0.0"}'

HEX_RE = {"sha256": re.compile(r"^[a-f0-9]{64}$"), "sha512": re.compile(r"^[a-f0-9]{128}$")}
_TMP_PREFIX = ".tmp-"


def tmp_name(directory: Path, hint: str) -> Path:
    return directory / f"{_TMP_PREFIX}{secrets.token_hex(8)}-{hint}"


def no_space(exc: OSError, where: Path) -> OSError | OutOfSpaceError:
    return out_of_space(exc, where, "nothing was changed") or exc


def blob_relpath(digest: str) -> PurePosixPath:
    """`blobs/<alg>/<hex>` for a validated digest; never anything that leaves `blobs/`."""
    check_digest(digest)
    algo, _, hexpart = digest.partition(":")
    rel = PurePosixPath(BLOBS_DIR, algo, hexpart)
    # check_digest admits only [a-z0-9:] so no separator or `..` can appear; keep it so.
    assert ".." not in rel.parts and len(rel.parts) == 3 and "/" not in hexpart
    return rel


def parse_oci_layout(data: bytes, where: str) -> None:
    obj = safejson.loads_object(data, where, max_size=MAX_MANIFEST_SIZE)
    if not isinstance(obj.get("imageLayoutVersion"), str):
        raise FormatError("missing imageLayoutVersion", where)
    version = obj["imageLayoutVersion"]
    if version.split(".")[0] != "1":
        raise FormatError(f"unsupported imageLayoutVersion {version!r}", where)


def parse_index(data: bytes, where: str) -> Index:
    return Index.from_bytes(data, where)  # every parse failure is a FormatError


def check_tag(tag: str) -> str:
    if not TAG_RE.fullmatch(tag):
        raise ConfigError(f"invalid tag {tag!r} (expected {TAG_RE.pattern.strip('^$')})")
    return tag


def open_regular(path: Path) -> tuple[BinaryIO, int]:
    """Open for reading, and the size; FileNotFoundError unless a regular file.

    Symlinks are followed (every blob is digest-checked, wherever its bytes live), but a
    FIFO, device or directory is never read (`fsutil.open_regular`).
    """
    try:
        fd = _fs_open_regular(path, follow_symlinks=True)
    except NotRegularFileError as exc:
        raise FileNotFoundError(errno.ENOENT, "not a regular file", str(path)) from exc
    return os.fdopen(fd, "rb"), os.fstat(fd).st_size


def read_file_capped(path: Path, cap: int) -> bytes:
    fh, _size = open_regular(path)
    with fh:
        data = fh.read(cap + 1)
    if len(data) > cap:
        raise SizeLimitError(f"{path} is larger than {cap} bytes")
    return data


def normalize_member(name: str) -> str | None:
    """`blobs/x` or `./blobs/x` -> `blobs/x`; None for anything unsafe or odd."""
    if name.startswith("/") or "\\" in name:
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


__all__ = [
    "BLOBS_DIR",
    "CHUNK",
    "HEX_RE",
    "INDEX_FILE",
    "LAYOUT_FILE",
    "LEGACY_LOCK_FILE",
    "OCI_LAYOUT_BYTES",
    "REF_NAME",
    "blob_relpath",
    "check_tag",
    "lock_file",
    "locked_directory",
    "no_space",
    "normalize_member",
    "open_regular",
    "parse_index",
    "parse_oci_layout",
    "read_file_capped",
    "tmp_name",
]


def _flock(fd: int, path: Path) -> bool:
    """Exclusive flock on `fd`, waiting for the holder; False where flock is unsupported
    (some network file systems): we go on unlocked, with a warning; the worst case is a
    lost tag, never a wrong blob."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.info("waiting for another writer holding %s", path)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as exc:
        log.warning("cannot lock %s (%s); continuing unlocked", path, exc)
        return False
    return True


@contextlib.contextmanager
def locked_directory(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on the directory `path` itself: no lock file is made, so
    nothing is left in a layout to travel with `cp -r` or an upload of `DIR/*`.
    (Layouts written by earlier versions may hold an `index.json.lock`: ignored, and
    safe to delete while no writer runs.)"""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _flock(fd, path)
        yield
    finally:
        os.close(fd)  # closing releases the flock


@contextlib.contextmanager
def lock_file(path: Path) -> Iterator[None]:
    """Hold an exclusive lock through the file `path`, removed when released.

    The unlink race: the holder unlinks the file under the lock, so a waiter that
    opened it before may then get the lock on an inode no longer at `path`, while a
    newcomer creates a fresh file there and locks that: two holders. So a lock counts
    only if, once it is held, `path` still names the very inode locked; otherwise it is
    dropped and taken again. Only a holder ever unlinks, so a verified holder's file
    stays at `path` until it lets go: one holder at a time, and no file left behind
    (but after a crash, which the next holder removes in its turn)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        if not _flock(fd, path):
            locked = False
            break
        try:
            current = path.lstat()
        except FileNotFoundError:
            current = None
        held = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
            locked = True
            break
        os.close(fd)  # the previous holder removed it: lock the file now at `path`
    try:
        yield
    finally:
        try:
            if locked:
                path.unlink(missing_ok=True)  # under the lock: see above
        finally:
            os.close(fd)
