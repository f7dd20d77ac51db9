"""A write target read back as a release source: the publisher checks what clients
will fetch through the same `ReleaseReader` they use.

The target's calls block (oras, files); the publisher runs the reader on its own
event loop, so blocking it is harmless.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from exec_sandbox_assets.base.errors import AssetNotFoundError
from exec_sandbox_assets.oci.model import MAX_MANIFEST_SIZE, Descriptor, signature_tag
from exec_sandbox_assets.release.documents import AssetLayer
from exec_sandbox_assets.release.signing import MAX_PAYLOAD_SIZE, SignatureLayer
from exec_sandbox_assets.sources.base import Source

if TYPE_CHECKING:
    from exec_sandbox_assets.oci.target import Target


class TargetSource(Source):
    """Reads documents and small blobs back from a publish target."""

    def __init__(self, target: Target) -> None:
        self._target = target
        self.name = target.name
        self.key = f"target-{target.name}"

    async def _index(self, tag: str) -> bytes:
        data = self._target.read_manifest(tag)
        if data is None:
            raise AssetNotFoundError(f"{self.name}: no manifest under {tag}")
        return data

    async def _manifest(self, desc: Descriptor) -> bytes:
        return await self._index(desc.digest)

    async def _signature(self, index_digest: str) -> bytes:
        return await self._index(signature_tag(index_digest))

    async def _payload(self, layer: SignatureLayer, n: int) -> bytes:
        return self._target.read_blob(layer.payload_digest, MAX_PAYLOAD_SIZE)

    async def _small_blob(self, desc: Descriptor, cap: int = MAX_MANIFEST_SIZE) -> bytes:
        return self._target.read_blob(desc.digest, cap)

    @contextlib.asynccontextmanager
    async def _open(self, layer: AssetLayer, offset: int) -> AsyncIterator[AsyncIterator[bytes]]:
        raise AssetNotFoundError(f"{self.name}: layers are not read back ({layer.digest})")
        yield  # pragma: no cover - makes this an async generator
