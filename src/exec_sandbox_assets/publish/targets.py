"""Where a release is written: a registry, an OCI layout directory, or an archive.

Every target takes the same calls in the same order from the publisher (blobs,
manifests by digest, the index, the signature, then tags), and can read back what
it holds, which is how the publisher reuses `created` and checks its signature.

`open_target` parses the target text: `oci:DIR`, `oci-archive:FILE`, else a
registry reference (`http://127.0.0.1:5000/repo` for plain HTTP, `host/repo` for
HTTPS). The registry target lives in its own module so that `oras` and `requests`
are imported only when a registry is written to.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from exec_sandbox_assets.errors import AssetNotFoundError, ConfigError
from exec_sandbox_assets.oci.layout import (
    LayoutReader,
    LayoutWriter,
    extract_archive,
    write_archive,
)
from exec_sandbox_assets.oci.model import MAX_MANIFEST_SIZE, is_digest, sha256_digest
from exec_sandbox_assets.oci.reference import LayoutRef, parse_source_ref

log = logging.getLogger(__name__)


@dataclass
class PushStats:
    """What a target had to upload and what it already held (mutable counters)."""

    blobs_uploaded: int = 0
    bytes_uploaded: int = 0
    blobs_skipped: int = 0


@dataclass(frozen=True)
class RegistryOptions:
    """How to reach and log in to registries (unused by layout targets). Without a
    username, the `auths` of `docker_config` (default: `config.docker_config_path()`)."""

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_bundle: Path | None = None
    docker_config: Path | None = None


class Target(Protocol):
    """One destination of a release; see the module docstring for the call order."""

    name: str
    stats: PushStats

    def has_blob(self, digest: str) -> bool: ...

    def push_blob(self, path: Path, digest: str, size: int) -> None:
        """Upload the file unless the target has the blob already (counted either way)."""

    def push_bytes(self, data: bytes, media_type_for_log: str) -> str:
        """`push_blob` for small in-memory blobs; returns their digest."""

    def put_manifest(self, data: bytes, media_type: str, reference: str | None) -> None:
        """Store a manifest or index exactly as given, by digest (`None`) or under a tag."""

    def tag(self, data: bytes, media_type: str, tag: str) -> None:
        """Point `tag` at the (already stored) manifest or index `data`."""

    def read_manifest(self, reference: str) -> bytes | None:
        """The manifest/index bytes under a tag or digest, or None when absent."""

    def read_blob(self, digest: str, max_size: int) -> bytes:
        """A small blob, verified against `digest`."""

    def close(self, ok: bool) -> None:
        """Finish (archives are written here, only when `ok`) and release resources."""


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
        self._tmp = Path(tempfile.mkdtemp(prefix="archive-", dir=work_dir))
        layout = self._tmp / "layout"
        try:
            if self.archive.exists():
                extract_archive(self.archive, layout)
            super().__init__(layout, name=f"oci-archive:{self.archive}")
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise

    def close(self, ok: bool) -> None:
        try:
            if ok:
                write_archive(self.root, self.archive)
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)


def open_target(text: str, work_dir: Path, options: RegistryOptions | None = None) -> Target:
    """A connected target for `text` (registries are probed and logged in to here)."""
    ref = parse_source_ref(text)
    if isinstance(ref, LayoutRef):
        if ref.tag is not None:
            raise ConfigError(
                f"target {text!r}: give the layout without a tag; the release is tagged vVERSION"
            )
        if ref.kind == "oci-archive":
            return ArchiveTarget(ref.path, work_dir)
        return LayoutTarget(ref.path)
    from exec_sandbox_assets.publish.registry_target import RegistryTarget

    opts = options or RegistryOptions()
    return RegistryTarget(
        text,
        username=opts.username,
        password=opts.password,
        ca_bundle=opts.ca_bundle,
        docker_config=opts.docker_config,
        work_dir=work_dir,
    )


__all__ = [
    "ArchiveTarget",
    "LayoutTarget",
    "PushStats",
    "RegistryOptions",
    "Target",
    "open_target",
]
