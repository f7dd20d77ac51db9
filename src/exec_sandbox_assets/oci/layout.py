"""Reads an OCI image layout: a directory or an `oci-archive` tar (`LayoutReader`).

Archives are read in place: one scan of the tar headers, then positional reads
(`os.pread`) on one descriptor held open, so concurrent readers in threads never
share a file position and a replaced archive file cannot mix old offsets with
new bytes. Writing is `oci.layout_writer`, archives are written and unpacked by
`oci.archive`, and the layout's names and rules are `oci.layout_files`.

Knows nothing of exec-sandbox.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from exec_sandbox_assets.base.errors import (
    AssetNotFoundError,
    ConfigError,
    FormatError,
    SizeLimitError,
)
from exec_sandbox_assets.oci.layout_files import (
    BLOBS_DIR,
    CHUNK,
    HEX_RE,
    INDEX_FILE,
    LAYOUT_FILE,
    REF_NAME,
    blob_relpath,
    normalize_member,
    open_regular,
    parse_index,
    parse_oci_layout,
    read_file_capped,
)
from exec_sandbox_assets.oci.model import MAX_MANIFEST_SIZE, Descriptor, Index, verify_bytes


def _tags_of(index: Index) -> dict[str, Descriptor]:
    tags: dict[str, Descriptor] = {}
    for desc in index.manifests:
        name = desc.annotations.get(REF_NAME)
        # First entry wins, as containers/image resolves a duplicated ref.name.
        if name is not None and name not in tags:
            tags[name] = desc
    return tags


def _is_blob(name: str) -> bool:
    parts = name.split("/")
    if len(parts) != 3 or parts[0] != BLOBS_DIR:
        return False
    pattern = HEX_RE.get(parts[1])
    return pattern is not None and bool(pattern.fullmatch(parts[2]))


class _Slice(io.RawIOBase):
    """A seekable read-only window [start, start+size) of a shared descriptor (pread)."""

    def __init__(self, fd: int, start: int, size: int, pos: int = 0) -> None:
        super().__init__()
        self._fd, self._start, self._size, self._pos = fd, start, size, pos

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), self._size - self._pos)
        if n <= 0:
            return 0
        data = os.pread(self._fd, n, self._start + self._pos)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)


@dataclass(frozen=True)
class _Member:
    name: str
    offset: int
    size: int


class LayoutReader:
    """Reads tags and verified blobs from a layout directory or an `oci-archive` tar."""

    def __init__(self, ref: Path, archive: bool) -> None:
        self.ref = Path(ref)
        self.archive = archive
        self._fd: int | None = None
        self._members: dict[str, _Member] = {}
        self._index: Index | None = None

    @classmethod
    def open(cls, ref: Path, archive: bool = False) -> LayoutReader:
        reader = cls(ref, archive)
        try:
            reader._open()
        except BaseException:
            reader.close()
            raise
        return reader

    def _open(self) -> None:
        ref = self.ref
        if not ref.exists():
            kind = "OCI archive" if self.archive else "OCI layout directory"
            raise AssetNotFoundError(f"{kind} {ref} does not exist")
        if self.archive:
            if not ref.is_file():
                raise ConfigError(f"{ref} is not a file (an oci-archive is a tar file)")
            self._scan_archive()
        elif not ref.is_dir():
            raise ConfigError(f"{ref} is not a directory (use an archive reader for a tar)")
        parse_oci_layout(self.read_meta(LAYOUT_FILE), self._where(LAYOUT_FILE))
        index = self.index()  # fail early on a malformed layout
        if self.archive:
            self._index = index  # an archive does not change under us: parse once

    def _scan_archive(self) -> None:
        fd = os.open(self.ref, os.O_RDONLY)
        self._fd = fd
        try:
            # "r:" = uncompressed only: in-place reads need real file offsets.
            with (
                os.fdopen(os.dup(fd), "rb") as fh,
                tarfile.open(fileobj=fh, mode="r:") as tar,
            ):
                for info in tar:
                    name = normalize_member(info.name)
                    if name is None or not (name in (LAYOUT_FILE, INDEX_FILE) or _is_blob(name)):
                        continue  # not something we would ever read
                    if not info.isreg() or info.issparse():
                        raise FormatError(
                            f"member {info.name!r} is not a regular file", str(self.ref)
                        )
                    # Later members win, as when a tar is extracted.
                    self._members[name] = _Member(info.name, info.offset_data, info.size)
        except tarfile.TarError as exc:
            raise FormatError(f"not an uncompressed tar archive: {exc}", str(self.ref)) from None

    def _where(self, name: str) -> str:
        if self.archive:
            member = self._members.get(name)
            return f"{self.ref}:{member.name if member else name}"
        return str(self.ref / name)

    def read_meta(self, name: str) -> bytes:
        """oci-layout or index.json bytes (capped; they are parsed whole)."""
        where = self._where(name)
        if self.archive:
            member = self._members.get(name)
            if member is None:
                raise FormatError(f"not an OCI layout archive: no {name}", str(self.ref))
            if member.size > MAX_MANIFEST_SIZE:
                raise FormatError(f"{member.size} bytes exceeds {MAX_MANIFEST_SIZE}", where)
            with self._open_member(member) as fh:
                return fh.read()
        path = self.ref / name
        if not path.is_file():
            raise FormatError(f"not an OCI layout: no {name}", str(self.ref))
        try:
            return read_file_capped(path, MAX_MANIFEST_SIZE)
        except SizeLimitError as exc:
            raise FormatError(str(exc), where) from None

    def _open_member(self, member: _Member, offset: int = 0) -> BinaryIO:
        if self._fd is None:
            raise ValueError(f"reader for {self.ref} is closed")
        return io.BufferedReader(_Slice(self._fd, member.offset, member.size, offset), CHUNK)

    # -- tags --

    def index(self) -> Index:
        """The top-level index.json (re-read each call for a directory: writers may add tags)."""
        if self._index is not None:
            return self._index
        return parse_index(self.read_meta(INDEX_FILE), self._where(INDEX_FILE))

    def tags(self) -> dict[str, Descriptor]:
        return _tags_of(self.index())

    def resolve(self, tag: str) -> Descriptor:
        tags = self.tags()
        desc = tags.get(tag)
        if desc is None:
            present = ", ".join(sorted(tags)) or "none"
            raise AssetNotFoundError(
                f"tag {tag!r} not found in {self.ref} (tags present: {present})"
            )
        return desc

    # -- blobs --

    def _blob_where(self, digest: str) -> str:
        rel = str(blob_relpath(digest))
        return self._where(rel)

    def has_blob(self, digest: str) -> bool:
        rel = str(blob_relpath(digest))
        if self.archive:
            return rel in self._members
        return (self.ref / rel).is_file()

    def blob_size(self, digest: str) -> int:
        rel = str(blob_relpath(digest))
        if self.archive:
            member = self._members.get(rel)
            if member is None:
                raise self._missing(digest)
            return member.size
        fh, size = self._open_file(digest)
        fh.close()
        return size

    def _open_file(self, digest: str) -> tuple[BinaryIO, int]:
        path = self.ref / str(blob_relpath(digest))
        try:
            return open_regular(path)
        except FileNotFoundError as exc:
            if path.exists():  # something, but not a regular file
                raise AssetNotFoundError(
                    f"{path}: blob {digest} is not a regular file (FIFO, device or "
                    "directory); not reading it"
                ) from exc
            raise self._missing(digest) from None

    def open_blob(self, digest: str, offset: int = 0) -> BinaryIO:
        """An unverified stream positioned at `offset`; the caller hashes what it reads."""
        if self.archive:
            size = self.blob_size(digest)
            fh = self._open_member(self._members[str(blob_relpath(digest))], 0)
        else:
            fh, size = self._open_file(digest)
        if not 0 <= offset <= size:
            fh.close()
            raise ValueError(f"offset {offset} outside blob {digest} of {size} bytes")
        fh.seek(offset)
        return fh

    def read_blob(self, digest: str, max_size: int) -> bytes:
        """The whole blob, verified against `digest`; refused above `max_size` bytes."""
        where = self._blob_where(digest)
        with self.open_blob(digest) as fh:
            size = fh.seek(0, os.SEEK_END)
            if size > max_size:
                raise SizeLimitError(f"{where}: blob {digest} is {size} bytes, limit {max_size}")
            fh.seek(0)
            data = fh.read(max_size + 1)
        if len(data) > max_size:
            raise SizeLimitError(f"{where}: blob {digest} grew beyond {max_size} bytes")
        return verify_bytes(data, digest, "blob", where)

    def _missing(self, digest: str) -> AssetNotFoundError:
        return AssetNotFoundError(f"blob {digest} not found in {self.ref}")

    # -- lifetime --

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> LayoutReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


__all__ = ["LayoutReader"]
