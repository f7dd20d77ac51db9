"""The writing half of `mirror`: copy a verified, planned release to a target in the
order of docs/format.md §2 (blobs, manifests, index, signature, bundle referrers, tags),
with resumable downloads, mounts between repositories of one registry, and one download
running ahead of each push. `mirror.py` reads and verifies; nothing here decides trust.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from exec_sandbox_assets.base.errors import AssetError, ConfigError, FormatError, OutOfSpaceError
from exec_sandbox_assets.base.sizes import describe_size
from exec_sandbox_assets.cache.space import free_bytes
from exec_sandbox_assets.cache.store import BlobRequest, Store
from exec_sandbox_assets.oci.model import (
    Descriptor,
    Index,
    media_type_of,
    sha256_digest,
    signature_tag,
)
from exec_sandbox_assets.oci.referrers import fallback_tag
from exec_sandbox_assets.release import catalog
from exec_sandbox_assets.release.documents import read_asset_layer
from exec_sandbox_assets.release.signing import parse_timestamp
from exec_sandbox_assets.release.version import LATEST
from exec_sandbox_assets.sources import Source

if TYPE_CHECKING:
    from exec_sandbox_assets.oci.targets import Target

log = logging.getLogger(__name__)

# Downloads started ahead of the blob being pushed (each holds one blob in work_dir).
_PREFETCH = 1

EventKind = Literal[
    "verified",  # a release's signature verified (name: the version)
    "blob-start",  # size: the blob's size; name: its title or role
    "blob-progress",  # size: bytes just downloaded (or found in a partial)
    "blob-done",  # copied
    "blob-skipped",  # the destination had it
    "blob-mounted",  # cross-repository mount on the same registry
    "manifest",  # a platform manifest stored (name: os/arch)
    "index",  # the index stored by digest
    "signature",  # the signature manifest stored under sha256-H.sig
    "tag",  # name: the tag written (the release is complete)
]


@dataclass(frozen=True)
class MirrorEvent:
    """One step of a mirror, for a progress display (the library logs too)."""

    kind: EventKind
    version: str
    digest: str = ""
    name: str = ""
    size: int = 0


ProgressCallback = Callable[[MirrorEvent], None]


@dataclass(frozen=True)
class Blob:
    desc: Descriptor
    name: str  # title, or what the blob is ("config of linux/amd64")
    data: bytes | None = None  # small blobs, read (and verified) already


@dataclass
class Plan:
    """A verified release, read and checked, ready to be written (then the counts)."""

    version: str
    tags: tuple[str, ...]
    index: bytes
    index_digest: str
    manifests: list[tuple[Descriptor, bytes]]
    blobs: list[Blob]
    signature: bytes | None
    signature_blobs: list[Blob]
    signed_by: tuple[str, ...]
    created: str | None
    # Bundle referrers of the index (descriptor, manifest bytes) and their small blobs.
    referrers: list[tuple[Descriptor, bytes]] = field(default_factory=list)
    referrer_blobs: list[Blob] = field(default_factory=list)
    latest_kept: bool = False
    blobs_copied: int = 0
    bytes_copied: int = 0
    blobs_skipped: int = 0
    blobs_mounted: int = 0


def platform_of(desc: Descriptor, where: str = "") -> tuple[str, str]:
    if desc.platform is None:
        raise FormatError(f"index entry {desc.digest} has no platform", where)
    return desc.platform.os, desc.platform.architecture


def show(platform: tuple[str, str]) -> str:
    return "/".join(platform)


# --------------------------------------------------------------------------- writing


class Copier:
    def __init__(
        self,
        source: Source,
        target: Target,
        store: Store,
        *,
        mount_from: str | None,
        keep_downloads: bool,
        progress: ProgressCallback | None,
    ) -> None:
        self.source = source
        self.target = target
        self.store = store
        self.mount_from = mount_from
        self.keep_downloads = keep_downloads
        self.progress = progress
        # (digest, size) of what this copy wrote to the target: blobs, manifests, indexes.
        self.written: list[tuple[str, int]] = []

    def _emit(
        self, plan: Plan, kind: EventKind, digest: str = "", name: str = "", size: int = 0
    ) -> None:
        if self.progress is not None:
            self.progress(MirrorEvent(kind, plan.version, digest, name, size))

    async def check_tags(self, plan: Plan, allow_downgrade: bool) -> None:
        """Refuse to move a version tag; keep a newer `latest`."""
        version_tag = f"v{plan.version}"
        existing = await asyncio.to_thread(self.target.read_manifest, version_tag)
        if existing is not None and sha256_digest(existing) != plan.index_digest:
            raise ConfigError(
                f"{self.target.name}:{version_tag} already names index "
                f"{sha256_digest(existing)}, not {plan.index_digest} as in {self.source.name}; "
                "a release never changes, so the mirror does not move its tag (remove the "
                "tag at the destination first if the source is the one to keep)"
            )
        if LATEST in plan.tags and not allow_downgrade:
            current = await asyncio.to_thread(self.target.read_manifest, LATEST)
            if current is not None and _newer(current, plan.created):
                log.warning(
                    "%s:latest names a newer release than %s; not moving it back",
                    self.target.name,
                    plan.version,
                )
                plan.tags = tuple(t for t in plan.tags if t != LATEST)
                plan.latest_kept = True

    async def copy(self, plan: Plan) -> None:
        await self._blobs(plan, plan.blobs)
        for desc, data in plan.manifests:
            await self._put_manifest(data, desc.digest, desc.media_type)
            self._emit(plan, "manifest", desc.digest, show(platform_of(desc)))
        index_type = media_type_of(plan.index, plan.index_digest)
        await self._put_manifest(plan.index, plan.index_digest, index_type)
        self._emit(plan, "index", plan.index_digest)
        if plan.signature is not None:
            await self._blobs(plan, plan.signature_blobs)
            sig_type = media_type_of(plan.signature, "signature")
            await asyncio.to_thread(
                self.target.put_manifest,
                plan.signature,
                sig_type,
                signature_tag(plan.index_digest),
            )
            self._emit(
                plan, "signature", sha256_digest(plan.signature), signature_tag(plan.index_digest)
            )
        if plan.referrers:
            await self._blobs(plan, plan.referrer_blobs)
            for desc, data in plan.referrers:
                await asyncio.to_thread(
                    self.target.put_referrer, data, desc.media_type, plan.index_digest
                )
                # A keyless signature: shown as one (the event kinds are a closed set).
                self._emit(plan, "signature", desc.digest, fallback_tag(plan.index_digest))
        for tag in plan.tags:
            await asyncio.to_thread(self.target.tag, plan.index, index_type, tag)
            self._emit(plan, "tag", plan.index_digest, tag)
            log.info("mirrored %s:%s -> %s", self.target.name, tag, plan.index_digest)

    async def _blobs(self, plan: Plan, blobs: Sequence[Blob]) -> None:
        """Copy what the destination lacks. Pushes run one at a time (the target is not
        shared between threads); the next download runs while the current blob is pushed,
        so a copy takes about as long as the slower side instead of the sum of both."""
        todo: list[Blob] = []
        for blob in blobs:
            desc = blob.desc
            if await asyncio.to_thread(self.target.has_blob, desc.digest):
                plan.blobs_skipped += 1
                self._emit(plan, "blob-skipped", desc.digest, blob.name, desc.size)
            elif await self._mount(desc.digest):
                plan.blobs_mounted += 1
                self._emit(plan, "blob-mounted", desc.digest, blob.name, desc.size)
            elif blob.data is not None:
                self._emit(plan, "blob-start", desc.digest, blob.name, desc.size)
                await asyncio.to_thread(self.target.push_bytes, blob.data, desc.media_type)
                self.written.append((desc.digest, desc.size))
                self._done(plan, blob)
            else:
                todo.append(blob)
        downloads: dict[int, asyncio.Task[Path]] = {}
        try:
            for i, blob in enumerate(todo):
                for j in range(i, min(i + 1 + _PREFETCH, len(todo))):
                    if j not in downloads:
                        downloads[j] = asyncio.create_task(self._download(plan, todo[j]))
                path = await downloads.pop(i)
                desc = blob.desc
                await asyncio.to_thread(self.target.push_blob, path, desc.digest, desc.size)
                self.written.append((desc.digest, desc.size))  # a failed push leaves nothing
                if not self.keep_downloads:
                    path.unlink(missing_ok=True)
                self._done(plan, blob)
        finally:
            for task in downloads.values():
                task.cancel()
            await asyncio.gather(*downloads.values(), return_exceptions=True)

    def _done(self, plan: Plan, blob: Blob) -> None:
        plan.blobs_copied += 1
        plan.bytes_copied += blob.desc.size
        self._emit(plan, "blob-done", blob.desc.digest, blob.name, blob.desc.size)

    async def _mount(self, digest: str) -> bool:
        # Not part of `Target`: only the registry target can mount.
        mount = getattr(self.target, "mount_blob", None)
        if mount is None or self.mount_from is None:
            return False
        return bool(await asyncio.to_thread(mount, digest, self.mount_from))

    async def _download(self, plan: Plan, blob: Blob) -> Path:
        """The blob as a verified file under work_dir (a partial from before is resumed)."""
        desc = blob.desc
        self._emit(plan, "blob-start", desc.digest, blob.name, desc.size)
        layer = read_asset_layer(desc, f"{self.source.name} layer {desc.digest}")
        # Signed chunk digests, when the layer has them: a bad range stops the copy at once.
        req = BlobRequest(desc.digest, desc.size, self.source.name, layer.chunks)
        opener = self.source.opener(layer)

        def advance(n: int) -> None:
            self._emit(plan, "blob-progress", desc.digest, blob.name, n)

        # The cache resumes a body that broke off after making progress (its one loop).
        async with self.store.blob_lock(desc.digest):
            return await self.store.fetch_blob(req, opener, advance)

    async def check_space(self, plans: Sequence[Plan]) -> None:
        """Before the first byte: an `oci:` layout destination (on this machine, so its free
        space is known) must have room for every blob and manifest it lacks. An archive is
        built in the work dir and replaced whole; a registry's space is its own."""
        from exec_sandbox_assets.oci.layout_target import ArchiveTarget, LayoutTarget

        if not isinstance(self.target, LayoutTarget) or isinstance(self.target, ArchiveTarget):
            return
        sizes: dict[str, int] = {}
        for plan in plans:
            sizes.update((b.desc.digest, b.desc.size) for b in (*plan.blobs, *plan.signature_blobs))
            sizes.update((d.digest, len(data)) for d, data in plan.manifests)
            sizes[plan.index_digest] = len(plan.index)
        lacking = [n for d, n in sizes.items() if not self.target.has_blob(d)]
        where, free = free_bytes(self.target.root)
        if sum(lacking) > free:
            raise OutOfSpaceError(
                f"not enough space in {where} for {self.target.name}: the copy needs "
                f"{describe_size(sum(lacking))} ({len(lacking)} blob(s) the destination "
                f"lacks) and {describe_size(free)} are free there; no blob was written. "
                "Free space there, or copy to another place"
            )

    async def _put_manifest(self, data: bytes, digest: str, media_type: str) -> None:
        new = not await asyncio.to_thread(self.target.has_blob, digest)
        await asyncio.to_thread(self.target.put_manifest, data, media_type, None)
        if new:
            self.written.append((digest, len(data)))

    def after_failure(self, remove: bool) -> str:
        """What this copy left at the destination, removed first when `remove` and the
        target can (a layout: what no tag reaches; an archive is replaced only on
        success): a sentence for the error, or "" when it wrote nothing."""
        if not self.written:
            return ""
        where = self.target.name
        discard = getattr(self.target, "discard", None)  # not part of `Target`: local only
        if remove and discard is not None:
            try:
                gone = set(discard([d for d, _ in self.written]))
            except (OSError, AssetError) as exc:
                log.warning("could not remove what the failed copy wrote: %s", exc)
                gone = set()
            removed = [(d, n) for d, n in self.written if d in gone]
            left = [(d, n) for d, n in self.written if d not in gone]
            text = (
                f"removed the {len(removed)} blob(s), {_bytes(removed)}, this mirror had "
                f"written to {where}"
            )
            if not left:
                return text
            return f"{text}; left {_left(left, where)}"
        return f"left {_left(self.written, where)}; a re-run reuses them"


def _bytes(blobs: Sequence[tuple[str, int]]) -> str:
    return describe_size(sum(n for _, n in blobs))


def _left(blobs: Sequence[tuple[str, int]], where: str) -> str:
    names = ", ".join(d for d, _ in blobs[:3]) + (", ..." if len(blobs) > 3 else "")
    return f"{len(blobs)} blob(s), {_bytes(blobs)}, at {where} that no tag names ({names})"


def _newer(current_index: bytes, created: str | None) -> bool:
    """Whether the destination's `latest` index was created after `created`."""
    try:
        theirs = Index.from_bytes(current_index, "latest").annotations.get(catalog.ANN_CREATED)
        if not theirs or not created:
            return False
        return parse_timestamp(theirs) > parse_timestamp(created)
    except (FormatError, ValueError):
        return False
