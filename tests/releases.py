"""Sample releases for end-to-end tests: a fresh key pair, the publisher's synthetic
build output, and `publish()` to any target (registry ref, `oci:DIR`, `oci-archive:FILE`).

    key = make_key_pair(tmp_path / "keys")
    rel = publish_sample_release(registry.ref(repo_name), "1.0.0", tmp_path / "work", key=key)
    rel.expected("vmlinuz-x86_64")   # the decompressed bytes a client must end up with
    rel.layer("vmlinuz-x86_64").digest

Also the few writes a test needs to tamper with a published release (`put_manifest`,
`push_bytes`, `flip_stored_blob`). No pytest dependency.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from exec_sandbox_assets.config import auth_files, docker_config_path
from exec_sandbox_assets.oci.model import signature_tag
from exec_sandbox_assets.oci.targets import RegistryOptions, Target, open_target
from exec_sandbox_assets.publish import PublishRequest, PublishResult, make_sample_inputs, publish
from exec_sandbox_assets.publish.compress import Blob
from exec_sandbox_assets.publish.inputs import find_inputs
from exec_sandbox_assets.publish.publisher import prepare_blobs
from exec_sandbox_assets.publish.sample import sample_bytes
from exec_sandbox_assets.release import catalog, keyless, keys, signing
from exec_sandbox_assets.release.catalog import AssetSpec

SAMPLE_SIZE = 256 * 1024
PLATFORMS: tuple[tuple[str, str], ...] = (("linux", "amd64"), ("linux", "arm64"))
LEVEL = 3  # fast; the level does not matter to a client


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: Path


def make_key_pair(directory: Path, name: str = "release", algorithm: str = "ecdsa-p256") -> KeyPair:
    """A fresh signing key written as `<name>.key` (0600) and `<name>.pub` in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    pair = KeyPair(directory / f"{name}.key", directory / f"{name}.pub")
    keys.write_key_pair(keys.generate_key(algorithm), pair.private, pair.public, None)
    return pair


@dataclass(frozen=True)
class SampleRelease:
    """What was published, and what a client must get from it."""

    target: str
    version: str
    key: KeyPair
    dist: Path  # the build output: decompressed files, by output name
    result: PublishResult
    blobs: Mapping[str, Blob]  # release name (layer title) -> blob digest/size/content

    @property
    def tag(self) -> str:
        return f"v{self.version}"

    @property
    def index_digest(self) -> str:
        return self.result.index_digest

    @property
    def signature_tag(self) -> str:
        return signature_tag(self.result.index_digest)

    @property
    def created(self) -> str:
        return self.result.created

    def spec(self, name: str) -> AssetSpec:
        spec = catalog.spec_for_name(name)
        if spec is None:
            raise KeyError(f"{name!r} is not an asset name")
        return spec

    def layer(self, name: str) -> Blob:
        """The blob of an asset, by release name or output name."""
        return self.blobs[self.spec(name).name]

    def expected(self, name: str) -> bytes:
        """The decompressed file a client must produce, by release name or output name."""
        return (self.dist / self.spec(name).output_name).read_bytes()


def publish_sample_release(
    target: str,
    version: str,
    work_dir: Path,
    *,
    key: KeyPair | None = None,
    size: int = SAMPLE_SIZE,
    sizes: Mapping[str, int] | None = None,
    created: str | None = None,
    tag_latest: bool = False,
    platforms: Sequence[tuple[str, str]] = PLATFORMS,
    username: str | None = None,
    password: str | None = None,
    ca_bundle: Path | None = None,
    replace: bool = False,
) -> SampleRelease:
    """Publish the sample build output (x86_64 + aarch64, linux gvproxy) as `version`.

    `work_dir` holds the key (when none is given), the sample files and the compressed
    blobs; reuse it across versions of one test to compress once. Sample contents depend
    only on file names and sizes, so two versions share their blobs. `sizes` overrides
    `size` per file (output name -> bytes), e.g. one large blob for a resume test: the
    samples compress about 4:1.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    key = key or make_key_pair(work_dir / "keys")
    overrides = {catalog.spec_for_name(n) or _unknown(n): b for n, b in (sizes or {}).items()}
    label = hashlib.sha256(
        repr((size, sorted((s.name, b) for s, b in overrides.items()))).encode()
    ).hexdigest()[:12]
    dist = make_sample_inputs(work_dir / f"dist-{label}", size=size)
    for spec, nbytes in overrides.items():
        (dist / spec.output_name).write_bytes(sample_bytes(spec, nbytes))
    compress_dir = work_dir / f"compressed-{label}"
    result = publish(
        PublishRequest(
            inputs=(dist,),
            version=version,
            targets=(target,),
            keys=(key.private,),
            work_dir=compress_dir,
            platforms=tuple(platforms),
            tag_latest=tag_latest,
            created=created,
            level=LEVEL,
            username=username,
            password=password,
            ca_bundle=ca_bundle,
            replace=replace,
        )
    )
    # Cached by the publish above: this only reads back digests and sizes.
    blobs = prepare_blobs(find_inputs((dist,), tuple(platforms)), compress_dir, LEVEL)
    return SampleRelease(target, result.version, key, dist, result, blobs)


def _unknown(name: str) -> AssetSpec:
    raise KeyError(f"{name!r} is not an asset name")


# --------------------------------------------------------------------------- tampering


def open_writer(
    target: str,
    work_dir: Path,
    *,
    username: str | None = None,
    password: str | None = None,
    ca_bundle: Path | None = None,
) -> Target:
    """The publisher's writer for `target`: `push_bytes`, `put_manifest`, `read_manifest`.
    Close it with `.close(True)` (archives are written then)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    return open_target(
        target,
        work_dir,
        RegistryOptions(username, password, ca_bundle, tuple(auth_files(docker_config_path()))),
    )


def put_manifest(target: str, work_dir: Path, data: bytes, media_type: str, tag: str) -> None:
    """Store manifest/index bytes under `tag` as they are (a registry must hold its children)."""
    writer = open_writer(target, work_dir)
    try:
        writer.put_manifest(data, media_type, tag)
    finally:
        writer.close(True)


def read_manifest(target: str, work_dir: Path, reference: str) -> bytes:
    writer = open_writer(target, work_dir)
    try:
        data = writer.read_manifest(reference)
    finally:
        writer.close(True)
    if data is None:
        raise KeyError(f"{target} has no manifest {reference}")
    return data


def stored_blob_path(registry_data_dir: Path, digest: str) -> Path:
    """Where distribution (filesystem driver) keeps a blob's bytes; manifests too."""
    hexpart = digest.partition(":")[2]
    return registry_data_dir / "docker/registry/v2/blobs/sha256" / hexpart[:2] / hexpart / "data"


def flip_stored_blob(registry_data_dir: Path, digest: str, offset: int | None = None) -> None:
    """Invert one byte of a blob in the registry's storage (default: the middle one).
    Distribution does not re-verify on read, so it serves the changed bytes as `digest`."""
    path = stored_blob_path(registry_data_dir, digest)
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def resign(
    index_digest: str, key: KeyPair, version: str, created: str | None
) -> signing.SignatureManifest:
    """A signature manifest over `index_digest` by `key` (e.g. an untrusted one)."""
    signing_key = keys.load_signing_key_file(key.private, None)
    return signing.sign_index(
        [signing_key], index_digest, catalog.DEFAULT_REPOSITORY, version, created
    )


def push_signature(
    target: str, work_dir: Path, index_digest: str, signature: signing.SignatureManifest
) -> None:
    """Store `signature` under the cosign tag of `index_digest` (replacing what is there)."""
    from exec_sandbox_assets.oci.model import MEDIA_TYPE_IMAGE_CONFIG, MEDIA_TYPE_MANIFEST

    writer = open_writer(target, work_dir)
    try:
        writer.push_bytes(signature.config, MEDIA_TYPE_IMAGE_CONFIG)
        for payload in signature.payloads:
            writer.push_bytes(payload, signing.SIMPLESIGNING_MEDIA_TYPE)
        writer.put_manifest(signature.manifest, MEDIA_TYPE_MANIFEST, signature_tag(index_digest))
    finally:
        writer.close(True)


__all__ = [
    "LEVEL",
    "PLATFORMS",
    "SAMPLE_SIZE",
    "KeyPair",
    "SampleRelease",
    "flip_stored_blob",
    "make_key_pair",
    "open_writer",
    "publish_sample_release",
    "push_signature",
    "put_manifest",
    "read_manifest",
    "resign",
    "stored_blob_path",
]


def read_bundles(text: str, index_digest: str) -> list[bytes]:
    """The Sigstore bundles a source (`Source.bundles`) holds for an index, as a client
    reads them (registry ref, `oci:DIR`, `oci-archive:FILE`)."""
    import asyncio

    from exec_sandbox_assets.oci.policy import DEFAULT_POLICY
    from exec_sandbox_assets.oci.reference import parse_source_ref
    from exec_sandbox_assets.sources import open_source

    async def go() -> list[bytes]:
        source = open_source(
            text, parse_source_ref(text), docker_config=None, ca_bundle=None, policy=DEFAULT_POLICY
        )
        try:
            return await source.bundles(index_digest)
        finally:
            await source.aclose()

    return asyncio.run(go())


# The release workflow the test Sigstore instance (tests/sigstore_instance.py) signs as.
TEST_WORKFLOW = "https://github.com/dualeai/exec-sandbox/.github/workflows/release.yml"


def verify_keyless(
    bundle: bytes, index_digest: str, version: str, root: Path
) -> keyless.KeylessSignature:
    """A bundle verified as a client verifies it: TEST_WORKFLOW at tag vVERSION, `root`."""
    return keyless.verify_bundle(
        bundle,
        index_digest=index_digest,
        version=version,
        workflows=(keyless.Workflow(TEST_WORKFLOW),),
        trusted_root=root,
    )
