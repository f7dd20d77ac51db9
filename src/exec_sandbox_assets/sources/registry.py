"""A repository on an OCI registry as a release source."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from exec_sandbox_assets.oci.model import (
    Descriptor,
    signature_tag,
)
from exec_sandbox_assets.release.documents import (
    AssetLayer,
)
from exec_sandbox_assets.release.signing import MAX_PAYLOAD_SIZE, SignatureLayer

if TYPE_CHECKING:  # the registry stack imports httpx, which a warm boot never needs
    from exec_sandbox_assets.oci.registry import RegistryClient

from exec_sandbox_assets.sources.base import Source, _skip


class RegistrySource(Source):
    """A repository on an OCI registry (ghcr.io, a mirror, a pull-through cache)."""

    def __init__(self, client: RegistryClient, text: str) -> None:
        self._client = client
        self.name = f"registry {text}"
        self.key = "registry-" + client.ref.key

    async def _index(self, tag: str) -> bytes:
        data, _media_type, _digest = await self._client.get_manifest(tag)
        return data

    async def _manifest(self, desc: Descriptor) -> bytes:
        data, _media_type, _digest = await self._client.get_manifest(desc.digest)
        return data

    async def _signature(self, index_digest: str) -> bytes:
        data, _media_type, _digest = await self._client.get_manifest(signature_tag(index_digest))
        return data

    async def _referrers(self, subject_digest: str, artifact_type: str | None) -> bytes | None:
        data = await self._client.get_referrers(subject_digest, artifact_type)
        if data is not None:
            return data
        return await super()._referrers(subject_digest, artifact_type)

    async def _payload(self, layer: SignatureLayer, n: int) -> bytes:
        return await self._client.get_blob(layer.payload_digest, MAX_PAYLOAD_SIZE)

    async def _small_blob(self, desc: Descriptor, cap: int) -> bytes:
        return await self._client.get_blob(desc.digest, cap)

    @contextlib.asynccontextmanager
    async def _open(self, layer: AssetLayer, offset: int) -> AsyncIterator[AsyncIterator[bytes]]:
        async with self._client.open_blob(layer.digest, offset) as stream:
            yield _skip(stream.chunks(), offset - stream.offset)

    async def aclose(self) -> None:
        await self._client.aclose()
