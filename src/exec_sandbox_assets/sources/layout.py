"""An OCI image layout directory or archive as a release source."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from exec_sandbox_assets.oci.model import (
    MAX_MANIFEST_SIZE,
    Descriptor,
    signature_tag,
)
from exec_sandbox_assets.release.documents import (
    AssetLayer,
)
from exec_sandbox_assets.release.signing import MAX_PAYLOAD_SIZE, SignatureLayer

if TYPE_CHECKING:  # the registry stack imports httpx, which a warm boot never needs
    from exec_sandbox_assets.oci.layout import LayoutReader

from exec_sandbox_assets.sources.base import Source, _read_chunks


class LayoutSource(Source):
    """An OCI image layout directory or archive (`oci:DIR`, `oci-archive:FILE`)."""

    local = True
    serves_patches = True

    def __init__(self, path: Path, archive: bool, text: str) -> None:
        self._path = path
        self._archive = archive
        self._reader: LayoutReader | None = None
        self.name = text
        resolved = str(path.resolve())
        self.key = f"layout-{path.name[:60]}-{hashlib.sha256(resolved.encode()).hexdigest()[:16]}"

    async def _open_reader(self) -> LayoutReader:
        if self._reader is None:
            from exec_sandbox_assets.oci.layout import LayoutReader

            self._reader = await asyncio.to_thread(LayoutReader.open, self._path, self._archive)
        return self._reader

    async def _index(self, tag: str) -> bytes:
        reader = await self._open_reader()
        desc = reader.resolve(tag)
        return await asyncio.to_thread(reader.read_blob, desc.digest, MAX_MANIFEST_SIZE)

    async def _manifest(self, desc: Descriptor) -> bytes:
        reader = await self._open_reader()
        return await asyncio.to_thread(reader.read_blob, desc.digest, MAX_MANIFEST_SIZE)

    async def _signature(self, index_digest: str) -> bytes:
        return await self._index(signature_tag(index_digest))

    async def _payload(self, layer: SignatureLayer, n: int) -> bytes:
        reader = await self._open_reader()
        return await asyncio.to_thread(reader.read_blob, layer.payload_digest, MAX_PAYLOAD_SIZE)

    async def _small_blob(self, desc: Descriptor, cap: int) -> bytes:
        reader = await self._open_reader()
        return await asyncio.to_thread(reader.read_blob, desc.digest, cap)

    async def list_tags(self) -> list[str]:
        reader = await self._open_reader()
        return sorted(reader.tags())

    def _open(
        self, layer: AssetLayer, offset: int
    ) -> contextlib.AbstractAsyncContextManager[AsyncIterator[bytes]]:
        return self._open_blob(layer.digest, offset)

    @contextlib.asynccontextmanager
    async def _open_blob(self, digest: str, offset: int) -> AsyncIterator[AsyncIterator[bytes]]:
        reader = await self._open_reader()
        fh = await asyncio.to_thread(reader.open_blob, digest, offset)
        try:
            yield _read_chunks(fh.read)
        finally:
            fh.close()

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
