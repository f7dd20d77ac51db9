"""`oci-archive` tar files: written from a layout directory, unpacked into one.

`write_archive` writes a deterministic, uncompressed tar (fixed member order, zero
mtimes and owners), hashing every blob on its way in, so an archive never holds bad
bytes. `extract_archive` refuses, before anything is written, every member that could
leave the layout (absolute paths, `..`), links and device files, and unpacks all or
nothing. Reading an archive in place is `oci.layout.LayoutReader`.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any

from exec_sandbox_assets.base.errors import (
    AssetChecksumError,
    AssetNotFoundError,
    ConfigError,
    FormatError,
)
from exec_sandbox_assets.base.fsutil import fsync_dir
from exec_sandbox_assets.oci.layout import LayoutReader
from exec_sandbox_assets.oci.layout_files import (
    BLOBS_DIR,
    CHUNK,
    HEX_RE,
    INDEX_FILE,
    LAYOUT_FILE,
    blob_relpath,
    no_space,
    normalize_member,
    tmp_name,
)
from exec_sandbox_assets.oci.model import new_hasher


class _HashingReader(io.RawIOBase):
    """Reads a blob file for tarfile while hashing it, so an archive never holds bad bytes."""

    def __init__(self, fh: io.BufferedReader, digest: str) -> None:
        super().__init__()
        self._fh, self.hasher = fh, new_hasher(digest)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._fh.readinto(buffer)
        self.hasher.update(memoryview(buffer)[:n])
        return n


def _tarinfo(name: str, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if directory:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    else:
        info.mode = 0o644
    return info


def write_archive(layout_dir: Path, archive: Path) -> None:
    """Write `layout_dir` as an uncompressed, deterministic `oci-archive` tar.

    `oci-layout` and `index.json` come first, then `blobs/` sorted; mtimes and
    owners are 0. Blobs are hashed on the way in. Written beside `archive` under
    a temp name, fsynced, renamed.
    """
    layout_dir, archive = Path(layout_dir), Path(archive)
    with LayoutReader.open(layout_dir) as reader:
        layout_bytes = reader.read_meta(LAYOUT_FILE)
        # One snapshot of index.json; blobs are only ever added, and writers add
        # them before tagging, so every blob this index needs is already present.
        index_bytes = reader.read_meta(INDEX_FILE)
    blobs: list[tuple[str, Path]] = []
    blobs_root = layout_dir / BLOBS_DIR
    if blobs_root.is_dir():
        for algo_dir in sorted(blobs_root.iterdir()):
            if algo_dir.name not in HEX_RE or not algo_dir.is_dir():
                continue
            for path in sorted(algo_dir.iterdir()):
                if HEX_RE[algo_dir.name].fullmatch(path.name) and path.is_file():
                    blobs.append((f"{algo_dir.name}:{path.name}", path))
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(archive.parent, archive.name)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as out:
            with tarfile.open(fileobj=out, mode="w:", format=tarfile.PAX_FORMAT) as tar:
                for name, data in ((LAYOUT_FILE, layout_bytes), (INDEX_FILE, index_bytes)):
                    tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
                tar.addfile(_tarinfo(f"{BLOBS_DIR}/", directory=True))
                for algo in sorted({d.partition(":")[0] for d, _ in blobs}):
                    tar.addfile(_tarinfo(f"{BLOBS_DIR}/{algo}/", directory=True))
                for digest, path in blobs:
                    _add_blob(tar, digest, path)
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(archive)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise no_space(exc, archive) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(archive.parent)


def _add_blob(tar: tarfile.TarFile, digest: str, path: Path) -> None:
    with path.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        reader = _HashingReader(fh, digest)
        tar.addfile(_tarinfo(str(blob_relpath(digest)), size), io.BufferedReader(reader, CHUNK))
        actual = f"{digest.partition(':')[0]}:{reader.hasher.hexdigest()}"
    if actual != digest:
        raise AssetChecksumError("blob", digest, actual, str(path))


def _check_member(info: tarfile.TarInfo, archive: Path) -> None:
    where = str(archive)
    name = info.name
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or "\\" in name:
        raise FormatError(f"member {name!r} has an absolute path", where)
    if ".." in PurePosixPath(name).parts:
        raise FormatError(f"member {name!r} escapes the layout", where)
    if info.issym() or info.islnk():
        raise FormatError(f"member {name!r} is a link ({info.linkname!r})", where)
    if not (info.isreg() or info.isdir()):
        raise FormatError(f"member {name!r} is not a regular file or directory", where)
    if normalize_member(name) is None and not info.isdir():  # "./" is the layout root
        raise FormatError(f"member {name!r} has an unsafe name", where)


def extract_archive(archive: Path, dest_dir: Path) -> None:
    """Unpack an `oci-archive` into `dest_dir` (absent or empty), all or nothing.

    Members outside the layout (absolute, `..`), links and device files are
    refused with FormatError before anything is written. The tree is unpacked
    beside `dest_dir` and renamed into place once it reads as a layout.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    if not archive.is_file():
        raise AssetNotFoundError(f"OCI archive {archive} does not exist")
    if dest_dir.exists() and (not dest_dir.is_dir() or any(dest_dir.iterdir())):
        raise ConfigError(f"{dest_dir} exists and is not an empty directory")
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(dest_dir.parent, dest_dir.name)
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            members = tar.getmembers()
            for info in members:
                _check_member(info, archive)
            tmp.mkdir()
            if hasattr(tarfile, "data_filter"):
                # Re-checks what we checked (defence in depth); drops odd modes and owners.
                tar.extractall(tmp, members=members, filter="data")
            else:  # Python < 3.11.4: our own checks above are the guard
                tar.extractall(tmp, members=members)  # noqa: S202
        _sync_tree(tmp)
        with LayoutReader.open(tmp):
            pass  # oci-layout and index.json present and well-formed
        tmp.replace(dest_dir)  # rename(2) replaces an empty directory atomically
    except tarfile.TarError as exc:  # FilterError included
        raise FormatError(f"unsafe or unreadable tar: {exc}", str(archive)) from None
    except OSError as exc:
        raise no_space(exc, dest_dir) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(dest_dir.parent)


def _sync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(Path(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


__all__ = ["extract_archive", "write_archive"]
