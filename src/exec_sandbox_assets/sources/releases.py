"""A GitHub Release folder as a release source (docs/format.md §6)."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from exec_sandbox_assets.base.errors import (
    AssetNotFoundError,
    FormatError,
)
from exec_sandbox_assets.base.safetext import redact_url
from exec_sandbox_assets.config import LATEST
from exec_sandbox_assets.oci.model import (
    MAX_MANIFEST_SIZE,
    Descriptor,
    Index,
    Manifest,
    sha256_digest,
)
from exec_sandbox_assets.oci.referrers import MAX_BUNDLE_SIZE
from exec_sandbox_assets.release import catalog
from exec_sandbox_assets.release.documents import (
    RELEASE_BUNDLE_FILE,
    RELEASE_INDEX_FILE,
    RELEASE_SIGNATURE_FILE,
    AssetLayer,
    release_manifest_file,
    release_payload_file,
)
from exec_sandbox_assets.release.signing import MAX_PAYLOAD_SIZE, SignatureLayer

if TYPE_CHECKING:  # the registry stack imports httpx, which a warm boot never needs
    from exec_sandbox_assets.oci.http import HttpCore

from exec_sandbox_assets.sources.base import Source, _skip


class ReleasesSource(Source):
    """A GitHub Release download base (docs/format.md §6): `{base}/vV/{name}`.

    The release folder holds the same bytes as the registry: `oci-index.json`,
    `oci-manifest-{os}-{arch}.json` (found by the platform of the index entry),
    `oci-signature.json` with `oci-signature-payload-{n}.json`, the Sigstore bundle
    `oci-index.sigstore.json` when the release was signed keyless, and every layer under
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
        self.name = f"releases {redact_url(self.base)}"
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
        from exec_sandbox_assets.oci.bodies import IDENTITY

        _response, data = await self._http.read("GET", url, IDENTITY, cap)
        return data

    async def _index(self, tag: str) -> bytes:
        folder = self.folder(tag)
        data = await self._get(f"{folder}/{RELEASE_INDEX_FILE}", MAX_MANIFEST_SIZE)
        try:
            index = Index.from_bytes(data, f"{folder}/{RELEASE_INDEX_FILE}")
        except FormatError:
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
            with contextlib.suppress(FormatError):
                for layer in Manifest.from_bytes(data, name).layers:
                    self._folders.setdefault(layer.digest, folder)
        return data

    async def _signature(self, index_digest: str) -> bytes:
        folder = self._folder_of(index_digest)
        data = await self._get(f"{folder}/{RELEASE_SIGNATURE_FILE}", MAX_MANIFEST_SIZE)
        with contextlib.suppress(FormatError):
            for n, layer in enumerate(Manifest.from_bytes(data, RELEASE_SIGNATURE_FILE).layers):
                self._folders.setdefault(layer.digest, folder)
                self._payload_numbers.setdefault(layer.digest, n)
        return data

    async def _referrers(self, subject_digest: str, artifact_type: str | None) -> bytes | None:
        return None  # a release folder has no tags; its bundle is a file of its own

    async def _bundle_files(self, index_digest: str) -> list[bytes] | None:
        folder = self._folder_of(index_digest)
        try:
            return [await self._get(f"{folder}/{RELEASE_BUNDLE_FILE}", MAX_BUNDLE_SIZE)]
        except AssetNotFoundError:
            return []  # a release signed with keys only

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
