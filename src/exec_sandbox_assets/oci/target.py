"""What every write target offers: the `Target` protocol (the call order the publisher
and `mirror` follow), its counters, and how to reach registries. Implementations:
`layout_target` (OCI layout directories and archives) and `registry_target`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from exec_sandbox_assets.oci.model import MEDIA_TYPE_INDEX
from exec_sandbox_assets.oci.referrers import fallback_tag, merge_referrer, referrer_descriptor

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
    username, the credentials found in `auth_files`, in order (`config.auth_files`)."""

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_bundle: Path | None = None
    auth_files: tuple[Path, ...] = ()


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

    def put_referrer(self, data: bytes, media_type: str, subject_digest: str) -> None:
        """Store referrer manifest `data` (its blobs pushed first) by digest and list it
        in the index under the subject's fallback tag (`store_referrer`)."""

    def read_manifest(self, reference: str) -> bytes | None:
        """The manifest/index bytes under a tag or digest, or None when absent."""

    def read_blob(self, digest: str, max_size: int) -> bytes:
        """A small blob, verified against `digest`."""

    def close(self, ok: bool) -> None:
        """Finish (archives are written here, only when `ok`) and release resources."""


def store_referrer(target: Target, data: bytes, media_type: str, subject_digest: str) -> None:
    """`Target.put_referrer` for every target: the manifest by digest, then the
    fallback tag's index read, merged and written. Always the tag, even where a
    registry has the referrers API: ghcr.io and distribution 2.8 have none, and a
    layout or archive none at all."""
    tag = fallback_tag(subject_digest)
    entry = referrer_descriptor(data, subject_digest, f"{target.name}: referrer")
    target.put_manifest(data, media_type, None)
    existing = target.read_manifest(tag)
    merged = merge_referrer(existing, entry, f"{target.name}:{tag} (referrers index)")
    if merged != existing:
        target.put_manifest(merged, MEDIA_TYPE_INDEX, tag)
        log.info(
            "listed referrer %s of %s in %s:%s", entry["digest"], subject_digest, target.name, tag
        )
