"""The source interface: the one place that caps sizes and checks digests.

Every source implements a few transport methods (`_index`, `_manifest`, ...); the public
methods of `Source` wrap them, so no source can hand back unverified bytes. Which
sources exist for a configuration is decided in `sources.build_sources`; in what order
they are tried, in the client.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

from exec_sandbox_assets.base.errors import (
    AssetChecksumError,
    AssetError,
    AssetNotFoundError,
    FormatError,
    SignatureError,
    SizeLimitError,
)
from exec_sandbox_assets.base.fsutil import CHUNK
from exec_sandbox_assets.cache.download import BlobOpener as BlobOpener
from exec_sandbox_assets.oci.model import (
    MAX_MANIFEST_SIZE,
    Descriptor,
    signature_tag,
    verify_bytes,
)
from exec_sandbox_assets.oci.referrers import (
    BUNDLE_MEDIA_TYPE,
    MAX_BUNDLE_SIZE,
    fallback_tag,
    parse_referrers,
    referrer_layers,
)
from exec_sandbox_assets.release.documents import (
    AssetLayer,
)
from exec_sandbox_assets.release.keyless import MAX_BUNDLES
from exec_sandbox_assets.release.signing import MAX_PAYLOAD_SIZE, SignatureLayer

log = logging.getLogger(__name__)


class Source(ABC):
    """One place to read a release from. Public methods return verified bytes only."""

    #: how the source is named in logs and errors (URL or path)
    name: str
    #: identifies the repository for per-repository state (rollback)
    key: str
    #: true for sources on this machine (layouts): usable in offline mode
    local: bool = False

    async def index(self, tag: str) -> bytes:
        """The index bytes the tag points to. The caller digests them itself."""
        data = await self._index(tag)
        if len(data) > MAX_MANIFEST_SIZE:
            raise SizeLimitError(f"{self.name}: index for {tag} exceeds {MAX_MANIFEST_SIZE} bytes")
        return data

    async def manifest(self, desc: Descriptor) -> bytes:
        if desc.size > MAX_MANIFEST_SIZE:
            raise SizeLimitError(f"{self.name}: manifest {desc.digest} is {desc.size} bytes")
        data = await self._manifest(desc)
        return verify_bytes(data, desc.digest, f"manifest {desc.digest}", self.name)

    async def signature(self, index_digest: str) -> bytes:
        """The signature manifest stored under the cosign tag of `index_digest`."""
        try:
            data = await self._signature(index_digest)
        except AssetNotFoundError:
            raise SignatureError(
                f"{self.name}: no signature for index {index_digest} "
                f"(expected tag {signature_tag(index_digest)}; a mirror must copy it too)"
            ) from None
        if len(data) > MAX_MANIFEST_SIZE:
            raise SizeLimitError(f"{self.name}: signature manifest exceeds {MAX_MANIFEST_SIZE}")
        return data

    async def payload(self, layer: SignatureLayer, n: int) -> bytes:
        if layer.payload_size > MAX_PAYLOAD_SIZE:
            raise SizeLimitError(f"{self.name}: signature payload of {layer.payload_size} bytes")
        try:
            data = await self._payload(layer, n)
        except AssetChecksumError as exc:
            # A transport may check the digest itself; say what the blob was for.
            raise AssetChecksumError(
                f"signature payload {n} ({exc.what})", exc.expected, exc.actual, exc.where
            ) from exc
        return verify_bytes(data, layer.payload_digest, f"signature payload {n}", self.name)

    async def referrers(self, subject_digest: str, artifact_type: str | None) -> list[Descriptor]:
        """The manifests naming `subject_digest` as subject, of `artifact_type` (every
        kind for None): the registry's referrers API when it answers with an index,
        else the fallback tag; [] when there are none. The list is unsigned: capped,
        parsed, and each entry still checked against its digest when read."""
        data = await self._referrers(subject_digest, artifact_type)
        if data is None:
            return []
        where = f"{self.name}: referrers of {subject_digest}"
        return parse_referrers(data, subject_digest, artifact_type, where)

    async def bundles(self, index_digest: str) -> list[bytes]:
        """The Sigstore bundles stored for index `index_digest` (as OCI referrers, or the
        release folder's file), each capped at MAX_BUNDLE_SIZE and checked against its
        descriptor's digest; [] when there are none. Unverified: the caller checks each
        bundle's signature, and one good bundle is enough."""
        stored = await self._bundle_files(index_digest)
        if stored is not None:
            for data in stored:
                if len(data) > MAX_BUNDLE_SIZE:
                    raise SizeLimitError(f"{self.name}: bundle exceeds {MAX_BUNDLE_SIZE} bytes")
            return stored
        out: list[bytes] = []
        failed: AssetError | None = None
        listed = await self.referrers(index_digest, BUNDLE_MEDIA_TYPE)
        if len(listed) > MAX_BUNDLES:
            # A client checks this many; the newest are listed last (each writer appends).
            log.warning(
                "%s: %d bundles listed for %s; reading the last %d",
                self.name,
                len(listed),
                index_digest,
                MAX_BUNDLES,
            )
            listed = listed[-MAX_BUNDLES:]
        for desc in listed:
            try:
                data = await self.manifest(desc)
                where = f"{self.name}: referrer {desc.digest}"
                for layer in referrer_layers(data, index_digest, BUNDLE_MEDIA_TYPE, where):
                    out.append(await self.small_blob(layer, MAX_BUNDLE_SIZE))
            except (AssetNotFoundError, AssetChecksumError, FormatError, SizeLimitError) as exc:
                # Another referrer may still hold a good bundle; the reason is kept
                # for when none does.
                log.warning("%s: bundle referrer %s skipped: %s", self.name, desc.digest, exc)
                failed = failed or exc
        if not out and failed is not None:
            raise failed
        return out

    def opener(self, layer: AssetLayer) -> BlobOpener:
        """Open the layer's blob from a byte offset; the store hashes and caps it."""
        return lambda offset: self._open(layer, offset)

    async def small_blob(self, desc: Descriptor, cap: int = MAX_MANIFEST_SIZE) -> bytes:
        """A small blob a verified manifest names (a config), verified against `desc`.

        Readers never need configs; `mirror` copies them verbatim."""
        if desc.size > cap:
            raise SizeLimitError(f"{self.name}: blob {desc.digest} is {desc.size} bytes")
        data = await self._small_blob(desc, cap)
        return verify_bytes(data, desc.digest, f"blob {desc.digest}", self.name)

    async def _small_blob(self, desc: Descriptor, cap: int) -> bytes:
        raise AssetNotFoundError(
            f"{self.name}: cannot serve blob {desc.digest} ({desc.media_type})"
        )

    async def _referrers(self, subject_digest: str, artifact_type: str | None) -> bytes | None:
        """The referrers index bytes, None when there is none. Here: the fallback tag
        (layouts, archives, write targets); registries ask their API first."""
        try:
            return await self._index(fallback_tag(subject_digest))
        except AssetNotFoundError:
            return None

    async def _bundle_files(self, index_digest: str) -> list[bytes] | None:
        """Bundles stored outside referrers (the GitHub Release folder); None: none such."""
        return None

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        pass

    def __str__(self) -> str:
        return self.name

    @abstractmethod
    async def _index(self, tag: str) -> bytes: ...

    @abstractmethod
    async def _manifest(self, desc: Descriptor) -> bytes: ...

    @abstractmethod
    async def _signature(self, index_digest: str) -> bytes: ...

    @abstractmethod
    async def _payload(self, layer: SignatureLayer, n: int) -> bytes: ...

    @abstractmethod
    def _open(
        self, layer: AssetLayer, offset: int
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]: ...


async def _read_chunks(read: Callable[[int], bytes]) -> AsyncIterator[bytes]:
    while chunk := await asyncio.to_thread(read, CHUNK):
        yield chunk


async def _skip(chunks: AsyncIterator[bytes], count: int) -> AsyncIterator[bytes]:
    """Drop `count` leading bytes: a server that ignored our Range sent the blob from 0."""
    async for chunk in chunks:
        if count >= len(chunk):
            count -= len(chunk)
            continue
        yield chunk[count:] if count else chunk
        count = 0
