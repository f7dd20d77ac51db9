"""An in-memory release source: the seam that lets failover, rollback and the trust
policy be tested through `AssetClient` without a server (as httpx's MockTransport).

    key = keys.generate_key()
    release = make_release("1.0.0", "2026-01-01T00:00:00Z", [key])
    mirror = FakeSource("mirror").add(release, "v1.0.0", "latest")
    client = AssetClient(settings, sources=lambda _settings: [mirror])

Releases are built with the package's own `release.documents` and `release.signing`
(as tests/releases.py publishes them to real registries); `FakeSource` is a real
`Source`, so its bytes pass the same caps and digest checks. No pytest dependency.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

import zstandard

from exec_sandbox_assets.base.errors import AssetDownloadError, AssetNotFoundError
from exec_sandbox_assets.oci.model import Descriptor, Manifest, sha256_digest
from exec_sandbox_assets.publish.sample import sample_bytes
from exec_sandbox_assets.release import catalog, signing
from exec_sandbox_assets.release.documents import (
    AssetLayer,
    LayerFile,
    ReleaseInfo,
    build_release,
)
from exec_sandbox_assets.release.keys import SigningKey
from exec_sandbox_assets.release.signing import SignatureLayer
from exec_sandbox_assets.sources.base import Source

PLATFORM = ("linux", "amd64")
DOCKER_REFERENCE = catalog.DEFAULT_REPOSITORY


@dataclass(frozen=True)
class MemoryRelease:
    """Every document and blob of one release, as bytes."""

    version: str
    created: str
    index: bytes
    documents: Mapping[str, bytes]  # digest -> platform manifest bytes
    blobs: Mapping[str, bytes]  # digest -> layer blob bytes
    contents: Mapping[str, bytes]  # output name -> the decompressed file a client gets
    signature: signing.SignatureManifest | None = field(default=None, repr=False)

    @property
    def digest(self) -> str:
        return sha256_digest(self.index)

    def signed(
        self,
        signers: Sequence[SigningKey],
        *,
        version: str | None = None,
        digest: str | None = None,
        created: str | None = None,
    ) -> MemoryRelease:
        """This release with a signature by `signers` (over another version, digest or
        created when given: what an attacker re-using a valid signature would serve)."""
        sig = signing.sign_index(
            signers,
            digest or self.digest,
            DOCKER_REFERENCE,
            version or self.version,
            created or self.created,
        )
        return MemoryRelease(
            self.version, self.created, self.index, self.documents, self.blobs, self.contents, sig
        )


def make_release(
    version: str,
    created: str,
    signers: Sequence[SigningKey] = (),
    *,
    platforms: Sequence[tuple[str, str]] = (PLATFORM,),
    size: int = 4096,
) -> MemoryRelease:
    """A release of every asset of `platforms` (sample contents, zstd where the format
    compresses), signed by `signers` (unsigned without)."""
    files: dict[tuple[str, str], list[LayerFile]] = {}
    blobs: dict[str, bytes] = {}
    contents: dict[str, bytes] = {}
    for os_, goarch in platforms:
        for spec in catalog.platform_assets(os_, goarch):
            content = sample_bytes(spec, size)
            blob = (
                zstandard.ZstdCompressor(level=1).compress(content) if spec.compressed else content
            )
            digest = sha256_digest(blob)
            blobs[digest] = blob
            contents[spec.output_name] = content
            files.setdefault((os_, goarch), []).append(
                LayerFile(spec, digest, len(blob), sha256_digest(content), len(content))
            )
    built = build_release(files, ReleaseInfo(version=version, created=created))
    documents = {sha256_digest(m): m for m in built.manifests.values()}
    release = MemoryRelease(version, created, built.index, documents, blobs, contents)
    return release.signed(signers) if signers else release


class FakeSource(Source):
    """A source holding releases in memory. `down = True` makes every request fail as an
    unreachable server does; `requests` records what was asked, in order."""

    def __init__(self, name: str) -> None:
        self.name = f"memory {name}"
        self.key = f"memory-{name}"
        self.down = False
        self.tags: dict[str, bytes] = {}
        self.documents: dict[str, bytes] = {}
        self.blobs: dict[str, bytes] = {}
        self.signatures: dict[str, bytes] = {}
        self.bundle_store: dict[str, list[bytes]] = {}  # index digest -> Sigstore bundles
        self.requests: list[str] = []

    def add(self, release: MemoryRelease, *tags: str) -> FakeSource:
        """Store `release` (and its signature, if any) under `tags` (default `v<version>`)."""
        for tag in tags or (f"v{release.version}",):
            self.tags[tag] = release.index
        self.documents[release.digest] = release.index
        self.documents.update(release.documents)
        self.blobs.update(release.blobs)
        if release.signature is not None:
            self.sign(release.digest, release.signature)
        return self

    def sign(self, index_digest: str, signature: signing.SignatureManifest) -> None:
        """Store `signature` under the cosign tag of `index_digest` (replacing one)."""
        self.signatures[index_digest] = signature.manifest
        manifest = Manifest.from_bytes(signature.manifest, "fake signature")
        for payload in signature.payloads:
            self.blobs[sha256_digest(payload)] = payload
        self.blobs[manifest.config.digest] = signature.config

    def add_bundle(self, index_digest: str, bundle: bytes) -> FakeSource:
        """Store a Sigstore bundle (keyless signature) for `index_digest`."""
        self.bundle_store.setdefault(index_digest, []).append(bundle)
        return self

    async def _bundle_files(self, index_digest: str) -> list[bytes] | None:
        # As the GitHub Release folder's file: `Source.bundles` caps each one.
        self._ask(f"bundles of {index_digest}")
        return list(self.bundle_store.get(index_digest, []))

    def _ask(self, what: str) -> None:
        self.requests.append(what)
        if self.down:
            raise AssetDownloadError(f"{self.name}: unreachable (connection refused)")

    def _get(self, table: Mapping[str, bytes], key: str, what: str) -> bytes:
        self._ask(f"{what} {key}")
        if key not in table:
            raise AssetNotFoundError(f"{self.name}: no {what} {key}")
        return table[key]

    async def _index(self, tag: str) -> bytes:
        if tag.startswith("sha256:"):
            return self._get(self.documents, tag, "manifest")
        return self._get(self.tags, tag, "tag")

    async def _manifest(self, desc: Descriptor) -> bytes:
        return self._get(self.documents, desc.digest, "manifest")

    async def _signature(self, index_digest: str) -> bytes:
        return self._get(self.signatures, index_digest, "signature of")

    async def _payload(self, layer: SignatureLayer, n: int) -> bytes:
        return self._get(self.blobs, layer.payload_digest, "blob")

    async def _small_blob(self, desc: Descriptor, cap: int) -> bytes:
        return self._get(self.blobs, desc.digest, "blob")

    @contextlib.asynccontextmanager
    async def _open(self, layer: AssetLayer, offset: int) -> AsyncIterator[AsyncIterator[bytes]]:
        data = self._get(self.blobs, layer.digest, "blob")

        async def chunks() -> AsyncIterator[bytes]:
            yield data[offset:]

        yield chunks()


__all__ = ["PLATFORM", "FakeSource", "MemoryRelease", "make_release"]
