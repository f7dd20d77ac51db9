"""Writes an OCI image layout directory: blobs, manifests and tags (`index.json`).

Writers never leave a half file under a final name: every blob and every
`index.json` is written to a temp name in its own directory, verified, fsynced
and renamed. A lock on the layout directory itself (`layout_files.locked_directory`:
no lock file, so nothing extra travels with a copy of the layout) only keeps two
writers from losing each other's tags; it is never what makes a blob correct (the
digest check is).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from exec_sandbox_assets.base import safejson
from exec_sandbox_assets.base.errors import (
    AssetChecksumError,
    AssetNotFoundError,
    ConfigError,
    FormatError,
    SizeLimitError,
)
from exec_sandbox_assets.base.fsutil import atomic_write, fsync_dir
from exec_sandbox_assets.oci.layout_files import (
    BLOBS_DIR,
    CHUNK,
    INDEX_FILE,
    LAYOUT_FILE,
    LEGACY_LOCK_FILE,
    OCI_LAYOUT_BYTES,
    REF_NAME,
    blob_relpath,
    check_tag,
    locked_directory,
    no_space,
    parse_index,
    parse_oci_layout,
    read_file_capped,
    tmp_name,
)
from exec_sandbox_assets.oci.model import (
    INDEX_MEDIA_TYPES,
    MANIFEST_MEDIA_TYPES,
    MAX_MANIFEST_SIZE,
    MEDIA_TYPE_INDEX,
    Descriptor,
    Index,
    Manifest,
    compute_digest,
    media_type_of,
    new_hasher,
    verify_bytes,
)

log = logging.getLogger(__name__)


class BlobWriter:
    """A writable temp file that becomes `blobs/<alg>/<hex>` only if it hashes right."""

    def __init__(self, final: Path, digest: str, size: int) -> None:
        self.final, self.digest, self.size = final, digest, size
        self._tmp = tmp_name(final.parent, final.name[:16])
        self._hasher = new_hasher(digest)
        self._written = 0
        try:
            fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:  # no inode left is a full disk too
            raise no_space(exc, self.final) from exc
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
            raise no_space(exc, self.final) from exc
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
            raise no_space(exc, self.final) from exc
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
            parse_oci_layout(layout_file.read_bytes(), str(layout_file))
        elif any(p.name != LEGACY_LOCK_FILE for p in self.root.iterdir()):
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
        return self.root.joinpath(*blob_relpath(digest).parts)

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

    def remove_unreferenced(self, digests: Iterable[str]) -> list[tuple[str, int]]:
        """Remove those of `digests` that no tagged entry of index.json reaches (its
        manifests, their config and layers): what a failed copy wrote and nothing names.
        Returns (digest, size) of each removed. Under the layout lock; a writer that reused
        one of them meanwhile finds it missing when it tags (`tag` refuses), never a tag
        naming an incomplete image."""
        removed: list[tuple[str, int]] = []
        with self._locked():
            _, entries = _read_index_json(self.root / INDEX_FILE)
            reached: set[str] = set()
            for entry in entries:  # validated by _read_index_json
                self._reach(Descriptor.from_json(entry, str(self.root)), reached, 0)
            for digest in dict.fromkeys(digests):
                path = self.blob_path(digest)
                if digest in reached or not path.is_file():
                    continue
                size = path.stat().st_size
                path.unlink()
                removed.append((digest, size))
        return removed

    def _reach(self, desc: Descriptor, reached: set[str], depth: int) -> None:
        """Add `desc` and every blob it names (present ones) to `reached`."""
        reached.add(desc.digest)
        if depth > 4 or not self.has_blob(desc.digest):
            return
        path = self.blob_path(desc.digest)
        if desc.media_type in INDEX_MEDIA_TYPES:
            index = Index.from_bytes(read_file_capped(path, MAX_MANIFEST_SIZE), str(path))
            for child in index.manifests:
                self._reach(child, reached, depth + 1)
        elif desc.media_type in MANIFEST_MEDIA_TYPES:
            manifest = Manifest.from_bytes(read_file_capped(path, MAX_MANIFEST_SIZE), str(path))
            reached.update(b.digest for b in (manifest.config, *manifest.layers))

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
            index = Index.from_bytes(read_file_capped(path, MAX_MANIFEST_SIZE), str(path))
            for child in index.manifests:
                self._check_complete(child, depth + 1)
        elif desc.media_type in MANIFEST_MEDIA_TYPES:
            manifest = Manifest.from_bytes(read_file_capped(path, MAX_MANIFEST_SIZE), str(path))
            for blob in (manifest.config, *manifest.layers):
                if not self.has_blob(blob.digest):
                    raise AssetNotFoundError(
                        f"{self.root}: blob {blob.digest} of manifest {desc.digest} missing"
                    )

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return locked_directory(self.root)


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
    data = read_file_capped(path, MAX_MANIFEST_SIZE)
    parse_index(data, where)  # validates every entry; raises FormatError naming the file
    obj = safejson.loads_object(data, where, max_size=MAX_MANIFEST_SIZE)
    entries = obj.pop("manifests")
    return obj, list(entries)


def _index_json_bytes(top: Mapping[str, Any], entries: list[dict[str, Any]]) -> bytes:
    obj: dict[str, Any] = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_INDEX}
    obj.update({k: v for k, v in top.items() if k != "manifests"})
    obj["manifests"] = entries
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


__all__ = ["BlobWriter", "LayoutWriter"]
