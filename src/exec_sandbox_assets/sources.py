"""Where a release can come from: registries, OCI layouts and archives, GitHub Releases.

Every source implements a few transport methods (`_index`, `_manifest`, ...); the base
class is the one place that caps sizes and checks digests, so no source can hand back
unverified bytes. Which sources are tried, and in what order, is decided in `fetch`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING

from exec_sandbox_assets import catalog
from exec_sandbox_assets.config import Settings
from exec_sandbox_assets.errors import AssetNotFoundError, SignatureError, SizeLimitError
from exec_sandbox_assets.oci.model import (
    MAX_MANIFEST_SIZE,
    Descriptor,
    signature_tag,
    verify_bytes,
)
from exec_sandbox_assets.release import AssetLayer
from exec_sandbox_assets.trust import SignatureLayer

if TYPE_CHECKING:  # the registry stack imports httpx, which a warm boot never needs
    from exec_sandbox_assets.oci.layout import LayoutReader
    from exec_sandbox_assets.oci.registry import RegistryClient

# A simple-signing payload is a few hundred bytes; anything near this is not one.
MAX_PAYLOAD_SIZE = 64 * 1024
CHUNK = 1024 * 1024

BlobOpener = Callable[[int], AbstractAsyncContextManager[AsyncIterator[bytes]]]


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
        data = await self._payload(layer, n)
        return verify_bytes(data, layer.payload_digest, f"signature payload {n}", self.name)

    def opener(self, layer: AssetLayer) -> BlobOpener:
        """Open the layer's blob from a byte offset; the store hashes and caps it."""
        return lambda offset: self._open(layer, offset)

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

    async def _payload(self, layer: SignatureLayer, n: int) -> bytes:
        return await self._client.get_blob(layer.payload_digest, MAX_PAYLOAD_SIZE)

    @contextlib.asynccontextmanager
    async def _open(self, layer: AssetLayer, offset: int) -> AsyncIterator[AsyncIterator[bytes]]:
        async with self._client.open_blob(layer.digest, offset) as stream:
            yield _skip(stream.chunks(), offset - stream.offset)

    async def aclose(self) -> None:
        await self._client.aclose()


class LayoutSource(Source):
    """An OCI image layout directory or archive (`oci:DIR`, `oci-archive:FILE`)."""

    local = True

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

    @contextlib.asynccontextmanager
    async def _open(self, layer: AssetLayer, offset: int) -> AsyncIterator[AsyncIterator[bytes]]:
        reader = await self._open_reader()
        fh = await asyncio.to_thread(reader.open_blob, layer.digest, offset)
        try:
            yield _read_chunks(fh.read)
        finally:
            fh.close()

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


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


def build_sources(settings: Settings) -> list[Source]:
    """The remote steps of SPEC.md section 7, in order: mirrors, then the default repository.

    Offline keeps only `oci:`/`oci-archive:` layouts (they are on this machine);
    air-gapped drops the public default repository.
    """
    from exec_sandbox_assets.oci.auth import load_docker_credentials
    from exec_sandbox_assets.oci.reference import LayoutRef, parse_source_ref
    from exec_sandbox_assets.oci.registry import RegistryClient

    entries = list(settings.mirrors)
    if not settings.offline and not (
        settings.airgap and settings.registry == catalog.DEFAULT_REPOSITORY
    ):
        entries.append(settings.registry)
    sources: list[Source] = []
    for text in dict.fromkeys(entries):  # ordered, without duplicates
        ref = parse_source_ref(text)
        if isinstance(ref, LayoutRef):
            sources.append(LayoutSource(ref.path, ref.kind == "oci-archive", text))
        elif not settings.offline:
            credentials = load_docker_credentials(ref.host, settings.docker_config)
            client = RegistryClient(ref, credentials=credentials, ca_bundle=settings.ca_bundle)
            sources.append(RegistrySource(client, text))
    return sources
