"""Write targets on this machine: an OCI image layout directory (`oci:DIR`) and an
OCI archive (`oci-archive:FILE`)."""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from exec_sandbox_assets.base.errors import AssetNotFoundError, ConfigError
from exec_sandbox_assets.oci.archive import extract_archive, write_archive
from exec_sandbox_assets.oci.layout import LayoutReader
from exec_sandbox_assets.oci.layout_files import lock_file
from exec_sandbox_assets.oci.layout_writer import LayoutWriter
from exec_sandbox_assets.oci.model import MAX_MANIFEST_SIZE, is_digest, sha256_digest
from exec_sandbox_assets.oci.target import PushStats, store_referrer

log = logging.getLogger(__name__)


class LayoutTarget:
    """An OCI image layout directory (skopeo's `oci:DIR`)."""

    def __init__(self, root: Path, name: str | None = None) -> None:
        self.root = Path(root)
        self.name = name or f"oci:{self.root}"
        self.stats = PushStats()
        self._writer = LayoutWriter(self.root)

    def has_blob(self, digest: str) -> bool:
        return self._writer.has_blob(digest)

    def push_blob(self, path: Path, digest: str, size: int) -> None:
        if self._writer.has_blob(digest):
            self.stats.blobs_skipped += 1
            return
        self._writer.put_blob_file(path, digest, size)  # verifies digest and size
        self.stats.blobs_uploaded += 1
        self.stats.bytes_uploaded += size

    def push_bytes(self, data: bytes, media_type_for_log: str) -> str:
        digest = sha256_digest(data)
        if self._writer.has_blob(digest):
            self.stats.blobs_skipped += 1
            return digest
        self._writer.put_blob_bytes(data, digest)
        log.debug("wrote %s %s to %s", media_type_for_log, digest, self.name)
        self.stats.blobs_uploaded += 1
        self.stats.bytes_uploaded += len(data)
        return digest

    def put_manifest(self, data: bytes, media_type: str, reference: str | None) -> None:
        tag = None if reference is None or is_digest(reference) else reference
        desc = self._writer.put_manifest(data, tag=tag)
        if reference is not None and is_digest(reference) and desc.digest != reference:
            raise ConfigError(f"{self.name}: manifest bytes do not match {reference}")

    def tag(self, data: bytes, media_type: str, tag: str) -> None:
        self._writer.put_manifest(data, tag=tag)

    def put_referrer(self, data: bytes, media_type: str, subject_digest: str) -> None:
        store_referrer(self, data, media_type, subject_digest)

    def read_manifest(self, reference: str) -> bytes | None:
        with LayoutReader.open(self.root) as reader:
            if is_digest(reference):
                digest = reference
            else:
                desc = reader.tags().get(reference)
                if desc is None:
                    return None
                digest = desc.digest
            try:
                return reader.read_blob(digest, MAX_MANIFEST_SIZE)
            except AssetNotFoundError:
                return None

    def read_blob(self, digest: str, max_size: int) -> bytes:
        with LayoutReader.open(self.root) as reader:
            return reader.read_blob(digest, max_size)

    def discard(self, digests: Sequence[str]) -> list[str]:
        """Remove those blobs of `digests` that no tag reaches (a failed copy's); returns
        the digests removed."""
        return [d for d, _ in self._writer.remove_unreferenced(digests)]

    def close(self, ok: bool) -> None:
        pass


class ArchiveTarget(LayoutTarget):
    """An `oci-archive` tar: a layout built in a temp dir, written as a tar at the end.

    An existing archive is unpacked first, so its other tags survive and blobs it
    holds are not rewritten; the archive file is replaced atomically, and only after
    the whole release (tags included) is in the layout.
    """

    def __init__(self, archive: Path, work_dir: Path) -> None:
        self.archive = Path(archive)
        work_dir.mkdir(parents=True, exist_ok=True)
        # Unpack, add, replace is a read-modify-write of the whole file: a second writer
        # that unpacked the old archive would drop the first writer's release. The lock
        # is held from before the unpack until the new archive has replaced the old; its
        # file beside the archive is removed when the lock is let go (`lock_file`).
        lock = self.archive.with_name(f".{self.archive.name}.lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(lock_file(lock))
        try:
            self._tmp = Path(tempfile.mkdtemp(prefix="archive-", dir=work_dir))
        except BaseException:
            self._lock.close()
            raise
        layout = self._tmp / "layout"
        try:
            if self.archive.exists():
                extract_archive(self.archive, layout)
            super().__init__(layout, name=f"oci-archive:{self.archive}")
        except BaseException:
            self._release()
            raise

    def discard(self, digests: Sequence[str]) -> list[str]:
        """All of them: the archive is replaced only on success (`close`), so nothing a
        failed copy wrote reaches it."""
        return list(digests)

    def close(self, ok: bool) -> None:
        try:
            if ok:
                write_archive(self.root, self.archive)
        finally:
            self._release()

    def _release(self) -> None:
        try:
            shutil.rmtree(self._tmp, ignore_errors=True)
        finally:
            self._lock.close()  # removes the lock file, then lets go
