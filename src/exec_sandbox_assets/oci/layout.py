"""OCI image layout directories and `oci-archive` tar files (image-spec `image-layout.md`).

A layout is `oci-layout` (`{"imageLayoutVersion":"1.0.0"}`), `index.json` and
`blobs/<alg>/<hex>`. Tags are `index.json` entries annotated with
`org.opencontainers.image.ref.name`, as skopeo and oras write them.

Writers never leave a half file under a final name: every blob and every
`index.json` is written to a temp name in its own directory, verified, fsynced
and renamed. The `index.json.lock` lock only keeps two writers from losing each
other's tags; it is never what makes a blob correct (the digest check is).

Archives are read in place: one scan of the tar headers, then positional reads
(`os.pread`) on one descriptor held open, so concurrent readers in threads never
share a file position and a replaced archive file cannot mix old offsets with
new bytes.

Knows nothing of exec-sandbox.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import logging
import os
import re
import secrets
import shutil
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import IO, Any, BinaryIO

from exec_sandbox_assets.errors import (
    AssetChecksumError,
    AssetNotFoundError,
    ConfigError,
    FormatError,
    OutOfSpaceError,
    SizeLimitError,
)
from exec_sandbox_assets.fsutil import (
    CHUNK,
    NotRegularFileError,
    atomic_write,
    fsync_dir,
    open_regular,
    out_of_space,
)
from exec_sandbox_assets.oci.model import (
    INDEX_MEDIA_TYPES,
    MANIFEST_MEDIA_TYPES,
    MAX_MANIFEST_SIZE,
    MEDIA_TYPE_INDEX,
    Descriptor,
    Index,
    Manifest,
    check_digest,
    compute_digest,
    media_type_of,
    new_hasher,
    verify_bytes,
)

log = logging.getLogger(__name__)

REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
LOCK_FILE = "index.json.lock"
BLOBS_DIR = "blobs"
OCI_LAYOUT_BYTES = b'{"imageLayoutVersion":"1.0.0"}'

# The distribution-spec tag grammar: what skopeo and registries accept as a tag.
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_HEX_RE = {"sha256": re.compile(r"^[a-f0-9]{64}$"), "sha512": re.compile(r"^[a-f0-9]{128}$")}
_TMP_PREFIX = ".tmp-"


# ---------------------------------------------------------------------------
# small file-system helpers


def _tmp_name(directory: Path, hint: str) -> Path:
    return directory / f"{_TMP_PREFIX}{secrets.token_hex(8)}-{hint}"


def _no_space(exc: OSError, where: Path) -> OSError | OutOfSpaceError:
    return out_of_space(exc, where, "nothing was changed") or exc


def _blob_relpath(digest: str) -> PurePosixPath:
    """`blobs/<alg>/<hex>` for a validated digest; never anything that leaves `blobs/`."""
    check_digest(digest)
    algo, _, hexpart = digest.partition(":")
    rel = PurePosixPath(BLOBS_DIR, algo, hexpart)
    # check_digest admits only [a-z0-9:] so no separator or `..` can appear; keep it so.
    assert ".." not in rel.parts and len(rel.parts) == 3 and "/" not in hexpart
    return rel


def _parse_oci_layout(data: bytes, where: str) -> None:
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # deep nesting
        raise FormatError(f"not valid JSON: {exc}", where) from None
    if not isinstance(obj, dict) or not isinstance(obj.get("imageLayoutVersion"), str):
        raise FormatError("missing imageLayoutVersion", where)
    version = obj["imageLayoutVersion"]
    if version.split(".")[0] != "1":
        raise FormatError(f"unsupported imageLayoutVersion {version!r}", where)


def _parse_index(data: bytes, where: str) -> Index:
    try:
        return Index.from_bytes(data, where)
    except RecursionError as exc:  # json.loads on deeply nested arrays
        raise FormatError(f"not valid JSON: {exc}", where) from None


def _tags_of(index: Index) -> dict[str, Descriptor]:
    tags: dict[str, Descriptor] = {}
    for desc in index.manifests:
        name = desc.annotations.get(REF_NAME)
        # First entry wins, as containers/image resolves a duplicated ref.name.
        if name is not None and name not in tags:
            tags[name] = desc
    return tags


def check_tag(tag: str) -> str:
    if not _TAG_RE.fullmatch(tag):
        raise ConfigError(f"invalid tag {tag!r} (expected [A-Za-z0-9_][A-Za-z0-9._-]{{0,127}})")
    return tag


# ---------------------------------------------------------------------------
# writing


class BlobWriter:
    """A writable temp file that becomes `blobs/<alg>/<hex>` only if it hashes right."""

    def __init__(self, final: Path, digest: str, size: int) -> None:
        self.final, self.digest, self.size = final, digest, size
        self._tmp = _tmp_name(final.parent, final.name[:16])
        self._hasher = new_hasher(digest)
        self._written = 0
        fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._fh: IO[bytes] = os.fdopen(fd, "wb")

    @property
    def written(self) -> int:
        return self._written

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = len(data)
        if self._written + n > self.size:
            # Stop a runaway source at the promised size instead of filling the disk.
            raise SizeLimitError(
                f"blob {self.digest} exceeds its size {self.size} while writing {self.final}"
            )
        try:
            self._fh.write(data)
        except OSError as exc:
            raise _no_space(exc, self.final) from exc
        self._hasher.update(data)
        self._written += n
        return n

    def _commit(self) -> None:
        actual = f"{self.digest.partition(':')[0]}:{self._hasher.hexdigest()}"
        if actual != self.digest or self._written != self.size:
            what = f"blob ({self._written} bytes, expected {self.size})"
            raise AssetChecksumError(what, self.digest, actual, str(self.final))
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._tmp.replace(self.final)
        except OSError as exc:
            raise _no_space(exc, self.final) from exc
        fsync_dir(self.final.parent)

    def _discard(self) -> None:
        with contextlib.suppress(OSError):
            self._fh.close()
        self._tmp.unlink(missing_ok=True)


class LayoutWriter:
    """Adds blobs, manifests and tags to an OCI image layout directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"{self.root} exists and is not a directory")
        self.root.mkdir(parents=True, exist_ok=True)
        layout_file = self.root / LAYOUT_FILE
        if layout_file.exists():
            _parse_oci_layout(layout_file.read_bytes(), str(layout_file))
        elif any(p.name != LOCK_FILE for p in self.root.iterdir()):
            raise ConfigError(
                f"{self.root} is not empty and is not an OCI image layout (no {LAYOUT_FILE})"
            )
        # oci-layout first: a crash after it leaves a dir we recognise and complete
        # on the next run, never a non-empty dir we would refuse.
        if not layout_file.exists():
            atomic_write(layout_file, OCI_LAYOUT_BYTES)
        (self.root / BLOBS_DIR).mkdir(exist_ok=True)
        with self._locked():
            if not (self.root / INDEX_FILE).exists():
                atomic_write(self.root / INDEX_FILE, _index_json_bytes({}, []))

    # -- blobs --

    def blob_path(self, digest: str) -> Path:
        return self.root.joinpath(*_blob_relpath(digest).parts)

    def has_blob(self, digest: str) -> bool:
        # Existence only: every blob here was verified before its rename.
        return self.blob_path(digest).is_file()

    def _blob_dir(self, digest: str) -> Path:
        path = self.blob_path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def put_blob_bytes(self, data: bytes, digest: str | None = None) -> str:
        if digest is None:
            digest = compute_digest(data)
        path = self._blob_dir(digest)
        verify_bytes(data, digest, "blob", str(path))
        if not path.exists():
            with self.open_blob_writer(digest, len(data)) as out:
                out.write(data)
        return digest

    def put_blob_file(self, path: Path, digest: str, size: int) -> None:
        # Copied, not hard-linked: a later change to `path` must not alter a verified blob.
        final = self._blob_dir(digest)
        if final.exists():
            return
        with self.open_blob_writer(digest, size) as out, Path(path).open("rb") as src:
            while chunk := src.read(CHUNK):
                out.write(chunk)

    @contextlib.contextmanager
    def open_blob_writer(self, digest: str, size: int) -> Iterator[BlobWriter]:
        """Yield a writer; on a clean exit it is verified and renamed into place.

        A wrong size or digest removes the temp file and raises (SizeLimitError,
        AssetChecksumError); an exception in the body just removes it.
        """
        if size < 0:
            raise ValueError(f"negative size {size}")
        writer = BlobWriter(self._blob_dir(digest), digest, size)
        try:
            yield writer
            writer._commit()
        finally:
            writer._discard()

    # -- manifests and tags --

    def put_manifest(self, data: bytes, tag: str | None = None) -> Descriptor:
        """Store manifest/index bytes exactly as given; tag them when `tag` is set."""
        media_type = media_type_of(data, "manifest")
        digest = self.put_blob_bytes(data)
        desc = Descriptor(media_type, digest, len(data))
        if tag is not None:
            self.tag(desc, tag)
        return desc

    def tag(self, descriptor: Descriptor, tag: str) -> None:
        """Point `tag` at `descriptor` (replacing any entry with that ref.name).

        Refuses to tag content whose manifests, config or layers are missing, so a
        tag never names an incomplete image whatever moment an earlier copy stopped.
        """
        check_tag(tag)
        self._check_complete(descriptor, depth=0)
        entry = descriptor.to_json()
        entry["annotations"] = {**dict(descriptor.annotations), REF_NAME: tag}
        index_path = self.root / INDEX_FILE
        with self._locked():
            top, entries = _read_index_json(index_path)
            kept = [e for e in entries if _entry_ref(e) != tag]
            atomic_write(index_path, _index_json_bytes(top, [*kept, entry]))

    def _check_complete(self, desc: Descriptor, depth: int) -> None:
        if not self.has_blob(desc.digest):
            raise AssetNotFoundError(f"{self.root}: blob {desc.digest} ({desc.media_type}) missing")
        if depth > 4:
            raise FormatError(
                f"indexes nested deeper than 4 levels at {desc.digest}", str(self.root)
            )
        path = self.blob_path(desc.digest)
        if desc.media_type in INDEX_MEDIA_TYPES:
            index = Index.from_bytes(_read_capped(path, MAX_MANIFEST_SIZE), str(path))
            for child in index.manifests:
                self._check_complete(child, depth + 1)
        elif desc.media_type in MANIFEST_MEDIA_TYPES:
            manifest = Manifest.from_bytes(_read_capped(path, MAX_MANIFEST_SIZE), str(path))
            for blob in (manifest.config, *manifest.layers):
                if not self.has_blob(blob.digest):
                    raise AssetNotFoundError(
                        f"{self.root}: blob {blob.digest} of manifest {desc.digest} missing"
                    )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # Best effort: where flock is unsupported (some network file systems) we go on
        # unlocked; the worst case is a lost tag, never a wrong blob.
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for lock", extra={"path": str(self.root / LOCK_FILE)})
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                log.warning(
                    "cannot lock, continuing unlocked",
                    extra={"path": str(self.root / LOCK_FILE), "error": str(exc)},
                )
            yield
        finally:
            os.close(fd)  # closing releases the flock


def _open_regular(path: Path) -> tuple[BinaryIO, int]:
    """Open for reading, and the size; FileNotFoundError unless a regular file.

    Symlinks are followed (every blob is digest-checked, wherever its bytes live), but a
    FIFO, device or directory is never read (`fsutil.open_regular`).
    """
    try:
        fd = open_regular(path, follow_symlinks=True)
    except NotRegularFileError as exc:
        raise FileNotFoundError(errno.ENOENT, "not a regular file", str(path)) from exc
    return os.fdopen(fd, "rb"), os.fstat(fd).st_size


def _read_capped(path: Path, cap: int) -> bytes:
    fh, _size = _open_regular(path)
    with fh:
        data = fh.read(cap + 1)
    if len(data) > cap:
        raise SizeLimitError(f"{path} is larger than {cap} bytes")
    return data


def _entry_ref(entry: Mapping[str, Any]) -> str | None:
    ann = entry.get("annotations")
    if isinstance(ann, dict):
        ref = ann.get(REF_NAME)
        return ref if isinstance(ref, str) else None
    return None


def _read_index_json(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The top-level fields and raw entries of index.json, validated.

    Entries stay raw dicts so fields we do not model (written by other tools)
    survive our rewrite untouched.
    """
    where = str(path)
    data = _read_capped(path, MAX_MANIFEST_SIZE)
    _parse_index(data, where)  # validates every entry; raises FormatError naming the file
    obj = json.loads(data)
    entries = obj.pop("manifests")
    return obj, list(entries)


def _index_json_bytes(top: Mapping[str, Any], entries: list[dict[str, Any]]) -> bytes:
    obj: dict[str, Any] = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_INDEX}
    obj.update({k: v for k, v in top.items() if k != "manifests"})
    obj["manifests"] = entries
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


# ---------------------------------------------------------------------------
# reading


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
        _parse_oci_layout(self._read_meta(LAYOUT_FILE), self._where(LAYOUT_FILE))
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
                    name = _normalize_member(info.name)
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

    def _read_meta(self, name: str) -> bytes:
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
            return _read_capped(path, MAX_MANIFEST_SIZE)
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
        return _parse_index(self._read_meta(INDEX_FILE), self._where(INDEX_FILE))

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
        rel = str(_blob_relpath(digest))
        return self._where(rel)

    def has_blob(self, digest: str) -> bool:
        rel = str(_blob_relpath(digest))
        if self.archive:
            return rel in self._members
        return (self.ref / rel).is_file()

    def blob_size(self, digest: str) -> int:
        rel = str(_blob_relpath(digest))
        if self.archive:
            member = self._members.get(rel)
            if member is None:
                raise self._missing(digest)
            return member.size
        fh, size = self._open_file(digest)
        fh.close()
        return size

    def _open_file(self, digest: str) -> tuple[BinaryIO, int]:
        path = self.ref / str(_blob_relpath(digest))
        try:
            return _open_regular(path)
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
            fh = self._open_member(self._members[str(_blob_relpath(digest))], 0)
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


def _normalize_member(name: str) -> str | None:
    """`blobs/x` or `./blobs/x` -> `blobs/x`; None for anything unsafe or odd."""
    if name.startswith("/") or "\\" in name:
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def _is_blob(name: str) -> bool:
    parts = name.split("/")
    if len(parts) != 3 or parts[0] != BLOBS_DIR:
        return False
    pattern = _HEX_RE.get(parts[1])
    return pattern is not None and bool(pattern.fullmatch(parts[2]))


# ---------------------------------------------------------------------------
# archives


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
        layout_bytes = reader._read_meta(LAYOUT_FILE)
        # One snapshot of index.json; blobs are only ever added, and writers add
        # them before tagging, so every blob this index needs is already present.
        index_bytes = reader._read_meta(INDEX_FILE)
    blobs: list[tuple[str, Path]] = []
    blobs_root = layout_dir / BLOBS_DIR
    if blobs_root.is_dir():
        for algo_dir in sorted(blobs_root.iterdir()):
            if algo_dir.name not in _HEX_RE or not algo_dir.is_dir():
                continue
            for path in sorted(algo_dir.iterdir()):
                if _HEX_RE[algo_dir.name].fullmatch(path.name) and path.is_file():
                    blobs.append((f"{algo_dir.name}:{path.name}", path))
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(archive.parent, archive.name)
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
        raise _no_space(exc, archive) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(archive.parent)


def _add_blob(tar: tarfile.TarFile, digest: str, path: Path) -> None:
    with path.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        reader = _HashingReader(fh, digest)
        tar.addfile(_tarinfo(str(_blob_relpath(digest)), size), io.BufferedReader(reader, CHUNK))
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
    if _normalize_member(name) is None and not info.isdir():  # "./" is the layout root
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
    tmp = _tmp_name(dest_dir.parent, dest_dir.name)
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
        raise _no_space(exc, dest_dir) from exc
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


__all__ = [
    "REF_NAME",
    "BlobWriter",
    "LayoutReader",
    "LayoutWriter",
    "check_tag",
    "extract_archive",
    "write_archive",
]
