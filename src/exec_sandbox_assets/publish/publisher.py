"""Publish a release: build output in, signed OCI artifacts out (docs/format.md §2-§6).

    keys -> inputs -> targets (connect, log in) -> compress (each blob pushed as it is
         made when no target has vV yet: pipeline.py) -> documents -> sign with keys
         -> per target: blobs, manifests, index, signature, read back + verify,
            [keyless: sign once the first target holds the index, verify, store the
            bundle as a referrer, read back: publish/keyless.py], tags
         -> GitHub Release folder

Everything that can be wrong with the request (a key, a password, a missing file, a
registry that refuses us) fails before the first byte is uploaded. Tags come last on
every target, so `vV` never names an incomplete or unsigned release.

Re-running is a no-op: compression is deterministic, `created` is taken from the
`vV` index a target already holds, and an existing signature that our keys made
over the same payload is kept (ECDSA signatures differ on every signing), so the
second run uploads no blob and yields the same digests, signature included.
A `vV` that points at different content is not moved unless `replace` is set.

Signatures accumulate, as cosign appends them (publish/signatures.py);
`replace_signatures` keeps only the given keys'. A signature that does not verify
with its key is never written, and what the targets serve is read back through the
client's `ReleaseReader` before any tag is moved.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from exec_sandbox_assets.base.errors import (
    AssetError,
    ConfigError,
    FormatError,
)
from exec_sandbox_assets.config import auth_files, docker_config_path
from exec_sandbox_assets.oci.model import (
    EMPTY_JSON,
    MEDIA_TYPE_EMPTY,
    MEDIA_TYPE_IMAGE_CONFIG,
    MEDIA_TYPE_INDEX,
    MEDIA_TYPE_MANIFEST,
    Index,
    sha256_digest,
    signature_tag,
)
from exec_sandbox_assets.oci.targets import RegistryOptions, Target, open_target
from exec_sandbox_assets.publish import keyless as keyless_step
from exec_sandbox_assets.publish.compress import DEFAULT_LEVEL, Blob, check_level
from exec_sandbox_assets.publish.inputs import ReleaseInputs, find_inputs
from exec_sandbox_assets.publish.keyless import KeylessOptions
from exec_sandbox_assets.publish.pipeline import (
    BlobMaker,
    LockedProgress,
    prepare_blobs,
    push_as_made,
    push_blob,
)
from exec_sandbox_assets.publish.release_dir import (
    ReleaseFiles,
    check_release_dir,
    write_release_dir,
)
from exec_sandbox_assets.publish.signatures import (
    added_count,
    existing_signatures,
    plan_signature,
    read_back,
)
from exec_sandbox_assets.release import catalog, keys, signing
from exec_sandbox_assets.release.chunks import DEFAULT_CHUNK_SIZE, ChunkDigests, chunk_digests_of
from exec_sandbox_assets.release.documents import (
    BuiltRelease,
    LayerFile,
    ReleaseInfo,
    build_release,
)
from exec_sandbox_assets.release.version import LATEST, Version

if TYPE_CHECKING:
    from exec_sandbox_assets.client import Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PublishRequest:
    inputs: tuple[Path, ...]  # build output dirs (images/dist, the gvproxy build dir)
    version: str  # "0.22.0"; tagged "v0.22.0"
    targets: tuple[str, ...]  # registry refs, "oci:DIR", "oci-archive:FILE"
    keys: tuple[Path, ...]  # private keys; several = rotation, each one signs; () = keyless only
    work_dir: Path  # compressed files (reused by a re-run) and temp layouts
    key_password: bytes | None = field(default=None, repr=False)
    platforms: tuple[tuple[str, str], ...] | None = None  # None: those whose gvproxy exists
    tag_latest: bool = False
    release_dir: Path | None = None
    replace_release_dir: bool = False  # allow a release_dir holding another release
    created: str | None = None  # RFC 3339; default: the existing vV's, else now
    revision: str | None = None
    docker_reference: str = catalog.DEFAULT_REPOSITORY
    level: int = DEFAULT_LEVEL
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_bundle: Path | None = None
    replace: bool = False  # allow moving an existing vV to different content
    # Told about compressing (input bytes) and pushing (one step per blob); the CLI's bars.
    progress: Progress | None = field(default=None, repr=False, compare=False)
    replace_signatures: bool = False  # drop the targets' signatures by other keys
    keyless: KeylessOptions | None = None  # also sign keyless (Sigstore), docs/format.md §8


@dataclass(frozen=True)
class TargetResult:
    name: str
    blobs_uploaded: int
    bytes_uploaded: int
    blobs_skipped: int
    tags: tuple[str, ...]


@dataclass(frozen=True)
class PublishResult:
    version: str
    created: str
    index_digest: str
    manifest_digests: Mapping[tuple[str, str], str]
    signature_tag: str  # where key signatures are stored (none written when keyless only)
    signature_digest: str | None  # None: keyless only
    signers: int
    targets: tuple[TargetResult, ...]
    release_dir: Path | None = None
    release_files: tuple[str, ...] = ()
    signatures: int = 0  # in the signature manifest: ours, and those kept from before
    signatures_added: int = 0  # of those, made by this run (0: every key had signed)
    keyless_identity: str | None = None  # who signed keyless (WORKFLOW@refs/tags/vV)
    bundle_digest: str | None = None  # the bundle's referrer manifest

    @property
    def blobs_uploaded(self) -> int:
        return sum(t.blobs_uploaded for t in self.targets)

    @property
    def bytes_uploaded(self) -> int:
        return sum(t.bytes_uploaded for t in self.targets)

    @property
    def blobs_skipped(self) -> int:
        return sum(t.blobs_skipped for t in self.targets)


# --------------------------------------------------------------------------- checks


def normalize_version(version: str) -> str:
    """ "0.22.0" (a leading "v" is dropped: the tag adds it); refuses what no tag can hold."""
    if version.strip() == LATEST:
        raise ConfigError(
            "invalid version 'latest': publish a real version and add --latest to move the "
            "floating tag"
        )
    return Version.parse(version).text


def normalize_created(created: str) -> str:
    """RFC 3339 in UTC with a Z, the form the annotation and the payload carry."""
    try:
        moment = signing.parse_timestamp(created)
    except ValueError:
        raise ConfigError(f"created {created!r} is not an RFC 3339 timestamp") from None
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_created() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def load_keys(
    paths: Sequence[Path], password: bytes | None, keyless: bool = False
) -> tuple[keys.SigningKey, ...]:
    if not paths and not keyless:
        raise ConfigError(
            "no signing key given (--key FILE) and not --keyless: clients refuse unsigned "
            "releases; create a key with `exec-sandbox-assets keygen`, or sign keyless in CI"
        )
    return tuple(keys.load_signing_key_file(Path(p), password) for p in paths)


# --------------------------------------------------------------------------- blobs


def build_documents(
    inputs: ReleaseInputs, blobs: Mapping[str, Blob], info: ReleaseInfo
) -> BuiltRelease:
    # Platforms share blobs (darwin/arm64 and linux/arm64): each is chunk-hashed once.
    chunks = {name: _chunks_of(blob) for name, blob in blobs.items()}
    by_platform: dict[tuple[str, str], list[LayerFile]] = {}
    for os_, goarch in inputs.platforms:
        by_platform[(os_, goarch)] = [
            LayerFile(
                f.spec,
                blobs[f.spec.name].digest,
                blobs[f.spec.name].size,
                blobs[f.spec.name].content_digest,
                blobs[f.spec.name].content_size,
                chunks[f.spec.name],
            )
            for f in inputs.for_platform(os_, goarch)
        ]
    return build_release(by_platform, info)


def _chunks_of(blob: Blob) -> ChunkDigests | None:
    """Per-chunk digests for a blob of several chunks (a client streams those)."""
    if blob.size <= DEFAULT_CHUNK_SIZE:
        return None
    # Computed in the pass that wrote or read the blob; a blob from elsewhere is read.
    chunks = blob.chunks if blob.chunks is not None else chunk_digests_of(blob.path)
    if chunks.total != blob.size:
        raise ConfigError(f"{blob.path} changed size while being published")
    return chunks


# --------------------------------------------------------------------------- targets


def _existing_created(existing: Sequence[tuple[Target, bytes | None]], tag: str) -> str | None:
    for target, data in existing:
        if data is None:
            continue
        try:
            created = Index.from_bytes(data, f"{target.name}:{tag}").annotations.get(
                catalog.ANN_CREATED
            )
        except FormatError as exc:
            log.warning("%s:%s is not a release index: %s", target.name, tag, exc)
            continue
        if created:
            normalize_created(created)  # valid RFC 3339, else ConfigError
            log.info("reusing created %s of %s:%s", created, target.name, tag)
            return created  # verbatim: any rewrite would change the index digest
    return None


def _check_no_conflict(
    existing: Sequence[tuple[Target, bytes | None]], tag: str, index_digest: str
) -> None:
    for target, data in existing:
        if data is None or sha256_digest(data) == index_digest:
            continue
        raise ConfigError(
            f"{target.name}:{tag} already points at index {sha256_digest(data)}, and this "
            f"publish would make {index_digest} (different files, revision or created); "
            "refusing to move a release tag: publish a new version, or pass --replace"
        )


def push_release(
    target: Target,
    blobs: Sequence[Blob],
    built: BuiltRelease,
    signature: signing.SignatureManifest | None,
    keys: Sequence[keys.SigningKey],
    version: str,
    created: str,
    tags: Sequence[str],
    progress: Progress | None = None,
    pushed: Collection[str] = frozenset(),
    keyless: KeylessOptions | None = None,
    keyless_bundle: Callable[[], keyless_step.KeylessBundle] | None = None,
) -> keyless_step.KeylessBundle | None:
    """docs/format.md §2 order: blobs (but those `pushed` already, while compressing),
    manifests, index, signature, verify, [keyless bundle (made on first call, once the
    index is stored), stored and read back], tags. Returns the keyless bundle."""
    index_digest = sha256_digest(built.index)
    for blob in blobs:
        if blob.digest not in pushed:
            push_blob(target, blob, progress)
    target.push_bytes(EMPTY_JSON, MEDIA_TYPE_EMPTY)
    for data in built.manifests.values():
        target.put_manifest(data, MEDIA_TYPE_MANIFEST, None)
    target.put_manifest(built.index, MEDIA_TYPE_INDEX, None)
    if signature is not None:
        target.push_bytes(signature.config, MEDIA_TYPE_IMAGE_CONFIG)
        for payload in signature.payloads:
            target.push_bytes(payload, signing.SIMPLESIGNING_MEDIA_TYPE)
        target.put_manifest(signature.manifest, MEDIA_TYPE_MANIFEST, signature_tag(index_digest))
    bundle = None
    if keyless is not None and keyless_bundle is not None:
        bundle = keyless_bundle()  # made once the index is stored; verified
        keyless_step.store(target, bundle, index_digest)
    # Read back before tagging: what clients will fetch must verify with our keys and
    # our workflow, with every trusted root given.
    workflows = keyless.workflows if keyless is not None else ()
    roots = keyless.roots if keyless is not None else (None,)
    read_back(target, built, keys, version, created, workflows, roots)
    for tag in tags:
        target.tag(built.index, MEDIA_TYPE_INDEX, tag)
        log.info("tagged %s:%s -> %s", target.name, tag, index_digest)
    return bundle


# --------------------------------------------------------------------------- publish


def publish(req: PublishRequest) -> PublishResult:
    version = normalize_version(req.version)
    version_tag = f"v{version}"
    check_level(req.level)
    if not req.targets and req.release_dir is None:
        raise ConfigError("nothing to publish to: give --to TARGET and/or --release-dir DIR")
    created_arg = normalize_created(req.created) if req.created else None
    held = None  # before any work: a folder of another version is refused
    if req.release_dir is not None:
        held = check_release_dir(req.release_dir, version, replace=req.replace_release_dir)
    held_created = held.created if held is not None and held.version == version else None

    # A wrong key fails before any upload.
    keys = load_keys(req.keys, req.key_password, keyless=req.keyless is not None)
    inputs = find_inputs(req.inputs, req.platforms)
    req.work_dir.mkdir(parents=True, exist_ok=True)

    options = RegistryOptions(
        req.username, req.password, req.ca_bundle, tuple(auth_files(docker_config_path()))
    )
    progress = LockedProgress(req.progress) if req.progress is not None else None
    maker = BlobMaker(inputs, req.work_dir, req.level, progress)  # compresses from now on
    targets: list[Target] = []
    ok = False
    try:
        for text in dict.fromkeys(req.targets):
            targets.append(open_target(text, req.work_dir, options))

        existing = [(target, target.read_manifest(version_tag)) for target in targets]
        # Blobs go up as they are made, unless a vV tag is there to be compared with
        # first (nothing is uploaded before a conflict is refused): pipeline.py.
        early = targets if req.replace or all(d is None for _, d in existing) else []
        pushed = push_as_made(maker, early, progress)
        blobs = maker.result()
        created = (
            created_arg or _existing_created(existing, version_tag) or held_created or now_created()
        )
        info = ReleaseInfo(version=version, created=created, revision=req.revision)
        built = build_documents(inputs, blobs, info)
        index_digest = sha256_digest(built.index)
        if not req.replace:
            _check_no_conflict(existing, version_tag, index_digest)

        signature = None
        kept = None
        if keys:
            kept = existing_signatures(targets, index_digest, version, created)
            signature = plan_signature(
                kept.pairs,
                keys,
                index_digest,
                req.docker_reference,
                version,
                created,
                replace=req.replace_signatures,
                key_ids=kept.key_ids,
            )
        keyless_bundle = None
        if req.keyless is not None:
            keyless_options = req.keyless

            @functools.cache
            def keyless_bundle() -> keyless_step.KeylessBundle:
                return keyless_step.plan_bundle(
                    keyless_options, targets, built.index, version, created
                )

        unique = list({b.digest: b for b in blobs.values()}.values())
        tags = (version_tag, LATEST) if req.tag_latest else (version_tag,)
        results: list[TargetResult] = []
        for target in targets:
            log.info("pushing %s to %s", index_digest, target.name)
            push_release(
                target,
                unique,
                built,
                signature,
                keys,
                version,
                created,
                tags,
                progress,
                pushed,
                keyless=req.keyless,
                keyless_bundle=keyless_bundle,
            )
            results.append(
                TargetResult(
                    target.name,
                    target.stats.blobs_uploaded,
                    target.stats.bytes_uploaded,
                    target.stats.blobs_skipped,
                    tags,
                )
            )

        # Without targets, the release folder alone gets the bundle.
        bundle = keyless_bundle() if keyless_bundle is not None else None
        release_files: tuple[str, ...] = ()
        if req.release_dir is not None:
            layers = {name: blob.path for name, blob in blobs.items()}
            release_files = write_release_dir(
                req.release_dir,
                ReleaseFiles(
                    layers,
                    built.index,
                    built.manifests,
                    signature,
                    bundle.bundle if bundle is not None else None,
                ),
                replace=req.replace_release_dir or req.replace,
            )
        ok = True
    finally:
        maker.stop()
        errors: list[AssetError] = []
        for target in targets:
            try:
                target.close(ok)
            except AssetError as exc:
                errors.append(exc)
        if ok and errors:
            raise errors[0]

    return PublishResult(
        version=version,
        created=created,
        index_digest=index_digest,
        manifest_digests={p: sha256_digest(m) for p, m in built.manifests.items()},
        signature_tag=signature_tag(index_digest),
        signature_digest=sha256_digest(signature.manifest) if signature is not None else None,
        signers=len({k.public.key_id for k in keys}),
        targets=tuple(results),
        release_dir=req.release_dir,
        release_files=release_files,
        signatures=len(signature.payloads) if signature is not None else 0,
        signatures_added=(
            added_count(kept.pairs, signature) if signature is not None and kept else 0
        ),
        keyless_identity=bundle.identity if bundle is not None else None,
        bundle_digest=bundle.digest if bundle is not None else None,
    )


__all__ = [
    "PublishRequest",
    "PublishResult",
    "TargetResult",
    "build_documents",
    "existing_signatures",
    "normalize_created",
    "normalize_version",
    "plan_signature",
    "prepare_blobs",
    "publish",
    "push_release",
    "read_back",
]
