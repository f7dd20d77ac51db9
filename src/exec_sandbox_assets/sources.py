"""Where a release can come from: registries, OCI layouts and archives, GitHub Releases.

Every source implements a few transport methods (`_index`, `_manifest`, ...); the base
class is the one place that caps sizes and checks digests, so no source can hand back
unverified bytes. Which sources are tried, and in what order, is decided in `fetch`;
which sources exist for a configuration, in `build_sources`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING

from exec_sandbox_assets import catalog
from exec_sandbox_assets.config import LATEST, Settings
from exec_sandbox_assets.errors import (
    AssetChecksumError,
    AssetNotFoundError,
    FormatError,
    SignatureError,
    SizeLimitError,
)
from exec_sandbox_assets.oci.model import (
    MAX_MANIFEST_SIZE,
    Descriptor,
    Index,
    Manifest,
    sha256_digest,
    signature_tag,
    verify_bytes,
)
from exec_sandbox_assets.release import (
    RELEASE_INDEX_FILE,
    RELEASE_SIGNATURE_FILE,
    AssetLayer,
    release_manifest_file,
    release_payload_file,
)
from exec_sandbox_assets.trust import SignatureLayer

if TYPE_CHECKING:  # the registry stack imports httpx, which a warm boot never needs
    from exec_sandbox_assets.oci.auth import Credentials
    from exec_sandbox_assets.oci.http import HttpCore
    from exec_sandbox_assets.oci.layout import LayoutReader
    from exec_sandbox_assets.oci.reference import LayoutRef, RegistryRef
    from exec_sandbox_assets.oci.registry import RegistryClient

# A simple-signing payload is a few hundred bytes; anything near this is not one.
MAX_PAYLOAD_SIZE = 64 * 1024
CHUNK = 1024 * 1024

BlobOpener = Callable[[int], AbstractAsyncContextManager[AsyncIterator[bytes]]]

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

    async def _small_blob(self, desc: Descriptor, cap: int) -> bytes:
        return await self._client.get_blob(desc.digest, cap)

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

    async def _small_blob(self, desc: Descriptor, cap: int) -> bytes:
        reader = await self._open_reader()
        return await asyncio.to_thread(reader.read_blob, desc.digest, cap)

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


class ReleasesSource(Source):
    """A GitHub Release download base (SPEC.md section 6): `{base}/vV/{name}`.

    The release folder holds the same bytes as the registry: `oci-index.json`,
    `oci-manifest-{os}-{arch}.json` (found by the platform of the index entry),
    `oci-signature.json` with `oci-signature-payload-{n}.json`, and every layer under
    its title. Nothing here is trusted for where it came from: the base class and the
    store verify all of it exactly as for a registry (signature over the index bytes,
    manifest digests, blob digests). Redirects are followed (GitHub answers 302 to its
    CDN), blob reads resume with `Range`, and transient failures are retried by the
    shared HTTP core.

    `latest` reads the index from `{releases}/latest/download/oci-index.json` (the base
    with its trailing `/download` replaced by `/latest/download`; a base without
    `/download` uses `{base}/latest/`). The rest of that release is then read from its
    own `vV` folder, named by the index's version annotation, so a release published
    between two requests cannot mix two releases' files (the digest checks would refuse
    the mix anyway, but as a trust error).
    """

    def __init__(self, http: HttpCore, base: str, default_tag: str = LATEST) -> None:
        self._http = http
        self.base = base.rstrip("/")
        self.name = f"releases {self.base}"
        self.key = f"releases-{hashlib.sha256(self.base.encode()).hexdigest()[:16]}"
        self._default_tag = default_tag
        # Which release folder a digest was named by, and the platform of a manifest
        # digest: routing only (the bytes are verified whatever folder they came from).
        self._folders: dict[str, str] = {}
        self._platforms: dict[str, tuple[str, str]] = {}
        self._payload_numbers: dict[str, int] = {}

    def folder(self, tag: str) -> str:
        """The URL of the folder holding release `tag` (`vV` or `latest`)."""
        if not catalog.is_valid_title(tag):
            raise AssetNotFoundError(f"{self.name}: invalid release tag {tag!r}")
        if tag == LATEST:
            return latest_download_url(self.base)
        return f"{self.base}/{tag}"

    def _folder_of(self, digest: str) -> str:
        """The folder of the release that named `digest`; for one this source has not
        read, the configured version's. Under `latest` that folder may already hold a
        newer release, whose file would fail the digest check as a trust error: such a
        blob is "not here" instead (fetch then tries the next source)."""
        folder = self._folders.get(digest)
        if folder is not None:
            return folder
        if self._default_tag == LATEST:
            raise AssetNotFoundError(
                f"{self.name}: {digest} belongs to a release this source has not read, and "
                "`latest` may name another one by now"
            )
        return self.folder(self._default_tag)

    async def _get(self, url: str, cap: int) -> bytes:
        from exec_sandbox_assets.oci.http import IDENTITY

        _response, data = await self._http.read("GET", url, IDENTITY, cap, raw=False)
        return data

    async def _index(self, tag: str) -> bytes:
        folder = self.folder(tag)
        data = await self._get(f"{folder}/{RELEASE_INDEX_FILE}", MAX_MANIFEST_SIZE)
        try:
            index = Index.from_bytes(data, f"{folder}/{RELEASE_INDEX_FILE}")
        except (FormatError, RecursionError):  # deep nesting recurses in json.loads
            return data  # the caller parses it again and reports the error
        if tag == LATEST:
            version = index.annotations.get(catalog.ANN_VERSION, "").removeprefix("v")
            if version and catalog.is_valid_title(f"v{version}"):
                folder = self.folder(f"v{version}")
        self._folders[sha256_digest(data)] = folder
        for desc in index.manifests:
            self._folders[desc.digest] = folder
            if desc.platform is not None:
                self._platforms[desc.digest] = (desc.platform.os, desc.platform.architecture)
        return data

    async def _manifest(self, desc: Descriptor) -> bytes:
        platform = (
            (desc.platform.os, desc.platform.architecture)
            if desc.platform is not None
            else self._platforms.get(desc.digest)
        )
        if platform is None:
            raise AssetNotFoundError(
                f"{self.name}: manifest {desc.digest} has no platform in the index, so no "
                "release file name"
            )
        name = release_manifest_file(*platform)
        if not catalog.is_valid_title(name):
            raise AssetNotFoundError(f"{self.name}: no release file for platform {platform}")
        folder = self._folder_of(desc.digest)
        data = await self._get(f"{folder}/{name}", MAX_MANIFEST_SIZE)
        if sha256_digest(data) == desc.digest:  # route its layers; the base class verifies
            with contextlib.suppress(FormatError, RecursionError):
                for layer in Manifest.from_bytes(data, name).layers:
                    self._folders.setdefault(layer.digest, folder)
        return data

    async def _signature(self, index_digest: str) -> bytes:
        folder = self._folder_of(index_digest)
        data = await self._get(f"{folder}/{RELEASE_SIGNATURE_FILE}", MAX_MANIFEST_SIZE)
        with contextlib.suppress(FormatError, RecursionError):
            for n, layer in enumerate(Manifest.from_bytes(data, RELEASE_SIGNATURE_FILE).layers):
                self._folders.setdefault(layer.digest, folder)
                self._payload_numbers.setdefault(layer.digest, n)
        return data

    async def _payload(self, layer: SignatureLayer, n: int) -> bytes:
        # n counts signature layers; the file is numbered by the layer's manifest position.
        number = self._payload_numbers.get(layer.payload_digest, n)
        folder = self._folder_of(layer.payload_digest)
        return await self._get(f"{folder}/{release_payload_file(number)}", MAX_PAYLOAD_SIZE)

    @contextlib.asynccontextmanager
    async def _open(self, layer: AssetLayer, offset: int) -> AsyncIterator[AsyncIterator[bytes]]:
        url = f"{self._folder_of(layer.digest)}/{catalog.check_title(layer.title)}"
        async with self._http.open_stream(url, offset) as stream:
            yield _skip(stream.chunks(), offset - stream.offset)

    async def aclose(self) -> None:
        await self._http.aclose()


def latest_download_url(base: str) -> str:
    """`.../releases/download` -> `.../releases/latest/download` (GitHub's `latest` URL)."""
    base = base.rstrip("/")
    if base.endswith("/download"):
        return base[: -len("/download")] + "/latest/download"
    return f"{base}/{LATEST}"


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


def open_source(
    text: str,
    ref: RegistryRef | LayoutRef,
    *,
    docker_config: Path | None,
    ca_bundle: Path | None,
    credentials: Credentials | None = None,
) -> Source:
    """The source one parsed reference names: a layout on this machine, or a repository
    on a registry (credentials as given, else docker's config.json entry for its host)."""
    from exec_sandbox_assets.oci.auth import load_docker_credentials
    from exec_sandbox_assets.oci.reference import LayoutRef
    from exec_sandbox_assets.oci.registry import RegistryClient

    if isinstance(ref, LayoutRef):
        return LayoutSource(ref.path, ref.kind == "oci-archive", text)
    if credentials is None:
        credentials = load_docker_credentials(ref.host, docker_config)
    return RegistrySource(RegistryClient(ref, credentials=credentials, ca_bundle=ca_bundle), text)


def build_sources(settings: Settings) -> list[Source]:
    """The remote steps of SPEC.md section 7, in order: mirrors, then the default
    repository, then GitHub Releases.

    Offline keeps only `oci:`/`oci-archive:` layouts (they are on this machine).
    Air-gapped (`EXEC_SANDBOX_AIRGAP=1`) never contacts the public defaults: every
    registry source on ghcr.io and every releases base on github.com is dropped, the
    default repository and the default releases base included, whoever configured them.
    """
    from exec_sandbox_assets.oci.http import HttpCore
    from exec_sandbox_assets.oci.reference import LayoutRef, parse_source_ref

    entries = [*settings.mirrors, settings.registry]
    sources: list[Source] = []
    for text in dict.fromkeys(entries):  # ordered, without duplicates
        ref = parse_source_ref(text)
        if not isinstance(ref, LayoutRef) and settings.offline:
            continue
        if not isinstance(ref, LayoutRef) and (
            settings.airgap and _is_public_host(ref.host, _PUBLIC_REGISTRY_HOSTS)
        ):
            log.info("air-gapped: not using %s", text, extra={"source": text})
            continue
        sources.append(
            open_source(
                text, ref, docker_config=settings.docker_config, ca_bundle=settings.ca_bundle
            )
        )
    releases = settings.releases_url
    if settings.offline or not releases:
        pass
    elif settings.airgap and _is_public_host(_url_host(releases), _PUBLIC_RELEASE_HOSTS):
        log.info("air-gapped: not using %s", releases, extra={"source": releases})
    else:
        http = HttpCore(peer="release server", ca_bundle=settings.ca_bundle)
        sources.append(ReleasesSource(http, releases, settings.tag))
    return sources


# What EXEC_SANDBOX_AIRGAP keeps the client away from (subdomains included).
_PUBLIC_REGISTRY_HOSTS = ("ghcr.io",)
_PUBLIC_RELEASE_HOSTS = ("github.com", "githubusercontent.com")


def _url_host(url: str) -> str:
    from urllib.parse import urlsplit

    return (urlsplit(url).hostname or "").lower()


def _is_public_host(host: str, publics: tuple[str, ...]) -> bool:
    name = host.lower().rsplit(":", 1)[0] if host.count(":") == 1 else host.lower()
    return any(name == p or name.endswith(f".{p}") for p in publics)
