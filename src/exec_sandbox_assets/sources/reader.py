"""The one reader of a release: index by tag, signature, payloads, the policy's verdict,
then platform manifests and their asset layers (docs/format.md §5-§7).

    reader = ReleaseReader(source, policy)          # policy None: verification skipped
    release = await reader.read("v0.22.0")          # raises unless accepted
    part = await reader.platform(release, ("linux", "amd64"))
    pending = await reader.read_platform("v0.22.0", ("linux", "amd64"))
    ...                                             # download pending.layers' blobs
    part = await pending.verified                   # raises unless accepted

`read_platform` is the client's cold path, in as few round trips as the format allows:
the index, then its signature chain and the platform manifest together. The manifest
is checked against the index's digest for it, and the index against its signature
once that arrived; until then the blobs may download, but nothing of them is read for
install (`cache.gate`).

Every caller reads a release through this class: the client, `mirror`, `inspect`
(through `sources.report`, which collects findings instead of raising) and the
publisher's read-back. Sizes are capped and digests checked by `Source`; whether the release is
accepted is decided by `release.policy.accept_index` alone, on bytes read here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from exec_sandbox_assets.base.errors import (
    AssetChecksumError,
    AssetError,
    AssetNotFoundError,
    FormatError,
    SignatureError,
    TransportError,
    VersionMismatchError,
)
from exec_sandbox_assets.oci.model import (
    INDEX_MEDIA_TYPES,
    Descriptor,
    Index,
    Manifest,
    is_digest,
    sha256_digest,
)
from exec_sandbox_assets.release.catalog import ANN_VERSION
from exec_sandbox_assets.release.documents import AssetLayer, read_asset_layers
from exec_sandbox_assets.release.keyless import KeylessSignature
from exec_sandbox_assets.release.policy import (
    RollbackState,
    TrustPolicy,
    Verdict,
    accept_index,
    require_keys,
)
from exec_sandbox_assets.release.signing import SignatureLayer, read_signature_manifest
from exec_sandbox_assets.release.version import is_valid, version_of_tag
from exec_sandbox_assets.sources.base import Source

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SignatureRecord:
    """A signature manifest as read: its bytes, its signature layers, their payloads."""

    manifest: bytes
    layers: tuple[SignatureLayer, ...]
    payloads: Mapping[str, bytes] = field(hash=False)  # payload digest -> bytes

    def pairs(self) -> list[tuple[bytes, bytes]]:
        """(payload, signature) per layer, as the policy takes them."""
        return [(self.payloads[layer.payload_digest], layer.signature) for layer in self.layers]

    def key_ids(self) -> dict[bytes, str]:
        """signature -> the key id its layer names (unverified; for messages and rebuilds)."""
        return {layer.signature: layer.key_id for layer in self.layers if layer.key_id}


@dataclass(frozen=True)
class VerifiedIndex:
    """An index whose signature verified (or that the user chose not to verify)."""

    tag: str
    version: str
    digest: str
    index: Index
    created: str | None
    source: str
    signed: bool
    key_ids: tuple[str, ...] = ()
    data: bytes = field(default=b"", repr=False)
    signature: SignatureRecord | None = field(default=None, repr=False)
    identities: tuple[KeylessSignature, ...] = ()  # trusted workflows that signed keyless

    @property
    def signers(self) -> tuple[str, ...]:
        """Keys and workflows that vouched, as cache records name them."""
        return self.key_ids + tuple(s.trust_id for s in self.identities)


@dataclass(frozen=True)
class PlatformRelease:
    """The verified layers of one platform manifest of a verified index."""

    release: VerifiedIndex
    platform: tuple[str, str]
    manifest_digest: str
    layers: dict[str, AssetLayer] = field(hash=False)
    manifest: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class PendingPlatform:
    """A platform manifest read while its index's signature is still being checked.

    `layers` come from a manifest whose digest the (not yet verified) index names: their
    blobs may be downloaded into partials, nothing more, until `verified` resolved (to
    the same manifest, accepted) or raised (why the release was refused). `version` is
    the one the tag names, or else the index's annotation: the verdict must say the same.
    """

    source: str
    version: str
    platform: tuple[str, str]
    manifest_digest: str
    layers: dict[str, AssetLayer] = field(hash=False)
    verified: asyncio.Future[PlatformRelease] = field(hash=False, compare=False, repr=False)


class ReleaseReader:
    """Reads releases from one source, accepting them under one trust policy.

    `policy` None means verification is switched off (EXEC_SANDBOX_INSECURE_SKIP_VERIFY,
    `insecure_skip_verify`): logged loudly on every read. `keep_signature` (the mirror)
    also reads the signature when not verifying, to copy it.
    """

    def __init__(
        self, source: Source, policy: TrustPolicy | None, *, keep_signature: bool = False
    ) -> None:
        self.source = source
        self.policy = policy
        self.keep_signature = keep_signature

    async def read(
        self,
        tag: str,
        *,
        rollback: RollbackState | None = None,
        expected_version: str | None = None,
    ) -> VerifiedIndex:
        """The index under `tag` (or digest), accepted by the policy; raises otherwise.

        `rollback`: what was accepted before under a floating tag. `expected_version`:
        the version the release must be when `tag` does not say (a digest)."""
        data, digest, where = await self._fetch_index(tag)
        signed = await self._signature_for(digest, where)
        return await self._accept(tag, data, digest, where, signed, rollback, expected_version)

    async def read_platform(
        self,
        tag: str,
        platform: tuple[str, str],
        *,
        rollback: RollbackState | None = None,
        fallbacks: Sequence[Source] = (),
        policy: Awaitable[TrustPolicy | None] | None = None,
    ) -> PendingPlatform:
        """The platform manifest of the release under `tag`, as soon as it is read; its
        verdict (`verified`) follows when the signature chain, fetched meanwhile,
        arrived. Round trips: the index, then the signature manifest and the platform
        manifest together (the signature's payloads follow while the blobs download).

        The index is parsed before its signature verified, with the capped parser, only
        to find the manifest's digest and the version; the verdict is decided on the same
        bytes as `read` decides it. A signature this source cannot serve (a transport
        error) is asked of `fallbacks`: it is addressed by the index digest. `policy`,
        when given, is this reader's policy still being loaded (the keys parsed while
        the index is on its way); it replaces the one the reader was made with."""
        fetching = asyncio.ensure_future(self._fetch_index(tag))
        if policy is not None:
            try:
                self.policy = await policy
            except BaseException:
                fetching.cancel()
                await asyncio.gather(fetching, return_exceptions=True)
                raise
        data, digest, where = await fetching
        if self.policy is not None:  # no key: refused before anything more is fetched
            require_keys(self.policy, f"{where}: refusing unverified remote content")
        signing = asyncio.ensure_future(self._signature_for(digest, where, fallbacks))
        # Keyless trust alone (the default): the bundles decide, so they are asked for
        # beside the manifest, not after it.
        keyless_only = self.policy is not None and self.policy.workflows and not self.policy.keys
        bundles = asyncio.ensure_future(self.keyless_bundles(digest)) if keyless_only else None
        try:
            try:
                index = Index.from_bytes(data, where)
                desc = self._platform_desc(index, platform, tag)
            except (FormatError, AssetNotFoundError):
                # What is wrong with bytes no key vouched for yet is not reported before
                # the verdict: a refusal for the signature comes first, as with `read`.
                signed = await signing
                verified = await self._accept(
                    tag, data, digest, where, signed, rollback, None, bundles
                )
                part = await self.platform(verified, platform)
                return PendingPlatform(
                    self.source.name, verified.version, platform, part.manifest_digest,
                    part.layers, asyncio.ensure_future(_done(part)),
                )  # fmt: skip
            manifest, layers = await self._read_manifest(desc)
        except BaseException:
            pending = [signing] if bundles is None else [signing, bundles]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            raise
        named = version_of_tag(tag) or index.annotations.get(ANN_VERSION, "")
        provisional = named.removeprefix("v")

        async def verify() -> PlatformRelease:
            try:
                signed = await signing
                verified = await self._accept(
                    tag, data, digest, where, signed, rollback, None, bundles
                )
            finally:
                _drop(bundles)
            if verified.version != provisional:
                raise VersionMismatchError(
                    f"{where}: signed as release {verified.version}, "
                    f"but its index says {provisional[:140]!r}"
                )
            return PlatformRelease(verified, platform, desc.digest, layers, manifest)

        verdict = asyncio.ensure_future(verify())
        if not is_valid(provisional):
            # Nothing to name the download after before the verdict: wait for it.
            part = await verdict
            provisional = part.release.version
            verdict = asyncio.ensure_future(_done(part))
        return PendingPlatform(
            self.source.name, provisional, platform, desc.digest, layers, verdict
        )

    async def _fetch_index(self, tag: str) -> tuple[bytes, str, str]:
        source = self.source
        data = await source.index(tag)
        digest = sha256_digest(data)
        if is_digest(tag) and digest != tag:
            raise AssetChecksumError(f"index {tag}", tag, digest, source.name)
        return data, digest, f"{source.name} tag {tag} (index {digest})"

    async def _accept(
        self,
        tag: str,
        data: bytes,
        digest: str,
        where: str,
        signed: tuple[SignatureRecord | None, str | None],
        rollback: RollbackState | None,
        expected_version: str | None,
        bundles: Awaitable[list[bytes]] | None = None,
    ) -> VerifiedIndex:
        """The verdict on the index `data` (`digest`) from its key signature (`signed`:
        the record, or why there is none) and, when keys fall short and the policy trusts
        a release workflow, its Sigstore bundles (`bundles`: already being fetched)."""
        source = self.source
        signature, missing = signed
        parsed: list[Index] = []

        def annotations() -> Mapping[str, str]:
            # Called by the policy once the signature verified: untrusted bytes are
            # interpreted only after a trusted key vouched for them.
            parsed.append(Index.from_bytes(data, where))
            return parsed[-1].annotations

        def decide(bundles: Sequence[bytes]) -> Verdict:
            return accept_index(
                self.policy,
                tag=tag,
                index_digest=digest,
                signatures=signature.pairs() if signature is not None else (),
                claimed_key_ids=signature.key_ids() if signature is not None else None,
                bundles=bundles,
                annotations=annotations,
                expected_version=expected_version,
                rollback=rollback,
                where=where,
            )

        try:
            # Key signatures first: a release they vouch for costs no referrers lookup.
            verdict = decide(())
        except SignatureError:
            if self.policy is None or not self.policy.workflows:
                raise
            try:
                found = await (bundles if bundles is not None else self.keyless_bundles(digest))
                verdict = decide(found)
            except SignatureError as exc:
                if not missing:
                    raise
                raise SignatureError(f"{exc}; key signature: {missing}") from None
        index = parsed[-1] if parsed else Index.from_bytes(data, where)
        log.info(
            "release index verified: %s %s is %s (%s)",
            source.name,
            tag,
            verdict.version,
            digest,
            extra={"source": source.name, "tag": tag, "digest": digest, "version": verdict.version},
        )
        return VerifiedIndex(
            tag=tag,
            version=verdict.version,
            digest=digest,
            index=index,
            created=verdict.created,
            source=source.name,
            signed=verdict.signed,
            key_ids=verdict.key_ids,
            data=data,
            signature=signature,
            identities=verdict.identities,
        )

    async def keyless_bundles(self, digest: str) -> list[bytes]:
        """The Sigstore bundles of index `digest` (OCI referrers, or the release folder's
        file); [] when there are none. Unverified: the policy checks each."""
        bundles = await self.source.bundles(digest)
        log.debug(
            "%s: %d Sigstore bundle(s) for %s",
            self.source.name,
            len(bundles),
            digest,
            extra={"source": self.source.name, "digest": digest, "bundles": len(bundles)},
        )
        return bundles

    async def _signature_for(
        self, digest: str, where: str, fallbacks: Sequence[Source] = ()
    ) -> tuple[SignatureRecord | None, str | None]:
        """The key signature of the index (None when not needed or not found), and why
        there is none when keyless signatures may still vouch for it. A signature this
        source cannot serve is asked of `fallbacks` (it is addressed by the digest)."""
        if self.policy is not None:
            # Fail before any remote byte beyond the index is fetched.
            require_keys(self.policy, f"{where}: refusing unverified remote content")
            if not self.policy.keys:
                return None, None  # keyless trust alone: the bundles decide
            try:
                return await self._key_signature(digest, where, fallbacks), None
            except SignatureError as exc:
                if not self.policy.workflows:
                    raise
                # A keyless-only release has no key signature: its bundles decide.
                return None, str(exc)
        log.warning(
            "SIGNATURE VERIFICATION DISABLED: accepting an unverified release index from %s (%s)",
            self.source.name,
            digest,
            extra={"source": self.source.name, "digest": digest},
        )
        if not self.keep_signature:
            return None, None
        try:
            return await self.signature(digest, where), None
        except AssetError as exc:
            log.warning("no signature to copy for %s: %s", where, exc)
            return None, None

    async def _key_signature(
        self, digest: str, where: str, fallbacks: Sequence[Source]
    ) -> SignatureRecord:
        try:
            return await self.signature(digest, where)
        except TransportError:
            for source in fallbacks:
                if source is self.source:
                    continue
                try:
                    return await ReleaseReader(source, self.policy).signature(digest)
                except AssetError as exc:
                    log.warning("no signature for %s from %s: %s", digest, source.name, exc)
            raise

    async def signature(self, digest: str, where: str = "") -> SignatureRecord:
        """The signature manifest of index `digest` and every payload it lists (capped
        in number and size, each checked against its digest); nothing is verified."""
        where = where or f"{self.source.name} index {digest}"
        manifest = await self.source.signature(digest)
        layers = read_signature_manifest(manifest, f"{where} signature")
        payloads: dict[str, bytes] = {}
        for n, layer in enumerate(layers):
            if layer.payload_digest not in payloads:
                payloads[layer.payload_digest] = await self.source.payload(layer, n)
        return SignatureRecord(manifest, layers, payloads)

    async def platform(self, release: VerifiedIndex, platform: tuple[str, str]) -> PlatformRelease:
        """The asset layers of `release` for one platform (AssetNotFoundError if absent)."""
        desc = self._platform_desc(release.index, platform, release.version)
        return await self._platform_of(release, desc, platform)

    def _platform_desc(self, index: Index, platform: tuple[str, str], release: str) -> Descriptor:
        desc = index.for_platform(*platform)
        if desc is None:
            have = ", ".join(str(d.platform) for d in index.manifests if d.platform)
            raise AssetNotFoundError(
                f"{self.source.name}: release {release} has no {'/'.join(platform)} "
                f"manifest (it has: {have or 'none'})"
            )
        return desc

    async def platforms(self, release: VerifiedIndex) -> list[tuple[Descriptor, PlatformRelease]]:
        """Every platform manifest of `release`, read and checked (the mirror copies all)."""
        where = f"{self.source.name} index {release.digest}"
        out: list[tuple[Descriptor, PlatformRelease]] = []
        for desc in release.index.manifests:
            if desc.media_type in INDEX_MEDIA_TYPES:
                raise FormatError(f"nested index {desc.digest}: not an exec-sandbox release", where)
            if desc.platform is None:
                raise FormatError(f"index entry {desc.digest} has no platform", where)
            platform = (desc.platform.os, desc.platform.architecture)
            out.append((desc, await self._platform_of(release, desc, platform)))
        return out

    async def _platform_of(
        self, release: VerifiedIndex, desc: Descriptor, platform: tuple[str, str]
    ) -> PlatformRelease:
        data, layers = await self._read_manifest(desc)  # checked against the verified index
        return PlatformRelease(release, platform, desc.digest, layers, data)

    async def _read_manifest(self, desc: Descriptor) -> tuple[bytes, dict[str, AssetLayer]]:
        data = await self.source.manifest(desc)  # checked against the index's digest
        where = f"{self.source.name} manifest {desc.digest}"
        return data, read_asset_layers(Manifest.from_bytes(data, where), where)


async def _done(part: PlatformRelease) -> PlatformRelease:
    return part


def _drop(task: asyncio.Future[list[bytes]] | None) -> None:
    """A prefetch the verdict did not need: cancelled, or its error marked as seen."""
    if task is None:
        return
    if not task.done():
        task.cancel()
    elif not task.cancelled():
        task.exception()


__all__ = [
    "PendingPlatform",
    "PlatformRelease",
    "ReleaseReader",
    "SignatureRecord",
    "VerifiedIndex",
]
