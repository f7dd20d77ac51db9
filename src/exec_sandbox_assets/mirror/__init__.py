"""Copy signed releases between registries, OCI layout directories and archives.

    result = mirror(
        "ghcr.io/dualeai/exec-sandbox-assets",       # or http://HOST/REPO, oci:DIR, oci-archive:FILE
        "oci-archive:/media/usb/assets.tar",          # any of those too
        versions=["0.22.0", "0.21.3"],                # or "latest"
        trusted_keys=[Path("release.pub")],
        work_dir=Path("/var/tmp/exec-sandbox-mirror"),
    )

For each version, in this order:

1. read the index under `vV` (or `latest`) and VERIFY its signature with the trusted keys
   (threshold, and the signed version must be the one asked for) before anything is
   copied; with no trusted key this fails closed, unless `insecure_skip_verify` (logged
   loudly). Every version of the call is verified, and its platform manifests read and
   checked against their digests, before the first blob of any of them is copied;
2. copy the blobs the destination lacks: a blob it has is skipped (HEAD / file check);
   between two repositories of one registry, a blob is mounted (`POST
   /v2/<dst>/blobs/uploads/?mount=<digest>&from=<src>`), not copied; anything else is
   downloaded to `work_dir` (a `.partial` resumed by `Range` after an interruption, and
   verified against its digest before it is used), then pushed by the publisher's
   target (oras-py for registries: chunked uploads the registry checks again);
3. the platform manifests, the index by digest, the signature manifest (its config and
   payload blobs first) under `sha256-H.sig`, the Sigstore bundles of the index (OCI
   referrers: their blobs, manifests, and the referrers tag `sha256-H`, merged with
   what the destination lists there: docs/format.md §8), and only then the tag `vV`
   (and `latest` when `latest` was asked for): docs/format.md §2. An interrupted mirror leaves no tag
   naming an incomplete or unsigned release; running it again skips what arrived.

Documents are copied as the exact bytes read (never re-serialized), so every digest,
and with it the signature, is the same at the destination. One exception: a signature
manifest that lists layers other than signatures (it is unsigned; a source may pad it
with junk) is rebuilt from its signature layers alone, so junk is neither fetched nor
written. Likewise only bundle referrers made of small bundle blobs are copied (the
referrers list is unsigned): an air-gapped copy verifies keyless signatures with no
network.

`platforms` is a check, not a filter. The index is signed as a whole and cannot be
rewritten; a registry refuses an index whose platform manifests are missing
(distribution: MANIFEST_BLOB_UNKNOWN) and a manifest whose layers are missing, and an
OCI layout written here refuses to tag either (docs/format.md §2: a tag never names an
incomplete release). So a copy of a release always holds all of its platforms. Given
`platforms`, the mirror fails before copying anything when a release lacks one of them;
platforms beyond those are copied too, with a log line (a copy with fewer platforms
cannot be made without breaking the signature).

A destination tag `vV` that already names another index is not moved (a release
never changes; the mirror says so and copies nothing). `latest` is not moved back to
an older release than the one the destination's `latest` holds.

Credentials: `src_credentials` / `dst_credentials`, else the `auths` of the docker
`config.json` (`docker_config`, else `$DOCKER_CONFIG/config.json`, else
`~/.docker/config.json`). `ca_bundle` is used for both sides.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import shutil
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from exec_sandbox_assets.base.errors import (
    AssetChecksumError,
    AssetNotFoundError,
    ConfigError,
    FormatError,
    OutOfSpaceError,
    SizeLimitError,
)
from exec_sandbox_assets.cache.store import Store
from exec_sandbox_assets.config import auth_files, docker_config_path
from exec_sandbox_assets.mirror.copy import (
    Blob,
    Copier,
    EventKind,
    MirrorEvent,
    Plan,
    ProgressCallback,
    platform_of,
    show,
)
from exec_sandbox_assets.oci.auth import Credentials
from exec_sandbox_assets.oci.model import (
    Descriptor,
    Manifest,
    sha256_digest,
)
from exec_sandbox_assets.oci.policy import DEFAULT_POLICY, TransferPolicy
from exec_sandbox_assets.oci.reference import LayoutRef, RegistryRef, parse_source_ref
from exec_sandbox_assets.oci.referrers import BUNDLE_MEDIA_TYPE, MAX_BUNDLE_SIZE, referrer_layers
from exec_sandbox_assets.release.keyless import parse_workflows
from exec_sandbox_assets.release.policy import TrustPolicy, load_policy, require_keys
from exec_sandbox_assets.release.signing import build_signature_manifest
from exec_sandbox_assets.release.version import LATEST, Version
from exec_sandbox_assets.sources import Source, open_source
from exec_sandbox_assets.sources.reader import ReleaseReader, VerifiedIndex

if TYPE_CHECKING:
    from exec_sandbox_assets.oci.targets import Target

log = logging.getLogger(__name__)
_P = ParamSpec("_P")
_T = TypeVar("_T")


@dataclass(frozen=True)
class CopiedRelease:
    """What one version's copy did (counts are blobs: layers, configs, payloads)."""

    version: str
    tags: tuple[str, ...]
    index_digest: str
    manifest_digests: Mapping[tuple[str, str], str]
    signature_digest: str | None
    signed_by: tuple[str, ...]  # trusted key ids; () when verification was skipped
    blobs_copied: int
    bytes_copied: int
    blobs_skipped: int
    blobs_mounted: int
    latest_kept: bool = False  # `latest` at the destination was newer and stays


@dataclass(frozen=True)
class MirrorResult:
    source: str
    destination: str
    releases: tuple[CopiedRelease, ...]

    @property
    def blobs_copied(self) -> int:
        return sum(r.blobs_copied for r in self.releases)

    @property
    def bytes_copied(self) -> int:
        return sum(r.bytes_copied for r in self.releases)

    @property
    def blobs_skipped(self) -> int:
        return sum(r.blobs_skipped for r in self.releases)

    @property
    def blobs_mounted(self) -> int:
        return sum(r.blobs_mounted for r in self.releases)


async def mirror_async(
    src: str,
    dst: str,
    *,
    versions: Sequence[str],
    work_dir: Path,
    platforms: Sequence[tuple[str, str]] | None = None,
    trusted_keys: Sequence[Path] = (),
    threshold: int = 1,
    trusted_workflows: Sequence[str] = (),
    sigstore_root: Path | None = None,
    insecure_skip_verify: bool = False,
    allow_downgrade: bool = False,
    src_credentials: Credentials | None = None,
    dst_credentials: Credentials | None = None,
    ca_bundle: Path | None = None,
    docker_config: Path | None = None,
    progress: ProgressCallback | None = None,
    transfer: TransferPolicy = DEFAULT_POLICY,
) -> MirrorResult:
    """Copy `versions` of a release from `src` to `dst` (see the module docstring);
    `mirror` is the same call for synchronous code."""
    tags = _tags_of(versions)
    workflows = parse_workflows(",".join(trusted_workflows), "trusted workflow")
    policy = _policy(
        load_policy(trusted_keys, threshold, allow_downgrade, workflows, sigstore_root)
        if not insecure_skip_verify
        else None,
        src,
    )
    src_ref, dst_ref = _parse_side(src, "source"), _parse_side(dst, "destination")
    if _same_place(src_ref, dst_ref):
        raise ConfigError(f"source and destination are the same: {src} -> {dst}")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)

    source = _open_source(src, src_ref, src_credentials, ca_bundle, docker_config, transfer)
    target: Target | None = None
    copier: Copier | None = None
    ok = False
    try:
        plans = [await _plan(source, tag, policy, platforms, progress) for tag in tags]
        target = await asyncio.to_thread(
            _open_target, dst, work_dir, dst_credentials, ca_bundle, docker_config
        )
        copier = Copier(
            source,
            target,
            Store(work_dir / "download"),
            mount_from=_mount_from(src_ref, dst_ref),
            keep_downloads=isinstance(dst_ref, LayoutRef) and dst_ref.kind == "oci-archive",
            progress=progress,
        )
        for plan in plans:  # every conflict is found before anything is written
            await copier.check_tags(plan, allow_downgrade)
        await copier.check_space(plans)  # and a full destination too
        for plan in plans:
            await copier.copy(plan)
        ok = True
    except OutOfSpaceError as exc:
        # A full destination: what this run wrote there is removed, not left to fill it.
        note = await asyncio.to_thread(copier.after_failure, True) if copier else ""
        if not note:
            raise
        raise OutOfSpaceError(f"{exc}; {note}") from exc
    except BaseException:
        # Another failure: what was written stays for a re-run to reuse, and is named.
        if copier is not None and (note := await asyncio.to_thread(copier.after_failure, False)):
            log.warning("mirror to %s failed: %s", dst, note)
        raise
    finally:
        await source.aclose()
        if target is not None:
            await asyncio.to_thread(target.close, ok)
    if ok:
        shutil.rmtree(work_dir / "download", ignore_errors=True)
    return MirrorResult(
        source=src,
        destination=dst,
        releases=tuple(
            CopiedRelease(
                version=p.version,
                tags=p.tags,
                index_digest=p.index_digest,
                manifest_digests={platform_of(d): d.digest for d, _ in p.manifests},
                signature_digest=sha256_digest(p.signature) if p.signature else None,
                signed_by=p.signed_by,
                blobs_copied=p.blobs_copied,
                bytes_copied=p.bytes_copied,
                blobs_skipped=p.blobs_skipped,
                blobs_mounted=p.blobs_mounted,
                latest_kept=p.latest_kept,
            )
            for p in plans
        ),
    )


def _run_sync(fn: Callable[_P, Coroutine[Any, Any, _T]]) -> Callable[_P, _T]:
    """A synchronous twin of `fn` (same signature), running its own event loop."""

    @functools.wraps(fn)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        return asyncio.run(fn(*args, **kwargs))

    return run


mirror = _run_sync(mirror_async)
mirror.__doc__ = """Copy `versions` of a release from `src` to `dst` (see the module docstring).

Synchronous (it runs its own event loop); from async code use `mirror_async`."""


# --------------------------------------------------------------------------- setup


def _tags_of(versions: Sequence[str]) -> list[str]:
    if isinstance(versions, str):
        versions = [versions]
    if not versions:
        raise ConfigError("no version to mirror: give at least one (e.g. 0.22.0 or latest)")
    tags: list[str] = []
    for text in versions:
        tag = LATEST if text.strip() in ("", LATEST) else Version.parse(text).tag
        if tag not in tags:
            tags.append(tag)
    return tags


def _policy(policy: TrustPolicy | None, src: str) -> TrustPolicy | None:
    if policy is None:
        log.warning(
            "SIGNATURE VERIFICATION DISABLED (insecure_skip_verify): mirroring %s without "
            "checking who signed it",
            src,
            extra={"source": src},
        )
        return None
    require_keys(policy, f"{src}: refusing to copy an unverified release")
    return policy


def _parse_side(text: str, role: str) -> RegistryRef | LayoutRef:
    ref = parse_source_ref(text)
    if isinstance(ref, LayoutRef):
        if ref.tag is not None:
            raise ConfigError(f"{role} {text!r}: give the layout without a tag (use versions)")
    elif ref.tag or ref.digest:
        raise ConfigError(
            f"{role} {text!r}: give the repository without a tag or digest (use versions)"
        )
    return ref


def _same_place(a: RegistryRef | LayoutRef, b: RegistryRef | LayoutRef) -> bool:
    if isinstance(a, LayoutRef) and isinstance(b, LayoutRef):
        return a.path.resolve() == b.path.resolve()
    if isinstance(a, RegistryRef) and isinstance(b, RegistryRef):
        return (a.host, a.repository) == (b.host, b.repository)
    return False


def _mount_from(src: RegistryRef | LayoutRef, dst: RegistryRef | LayoutRef) -> str | None:
    """The source repository, when a blob can be mounted rather than copied."""
    if (
        isinstance(src, RegistryRef)
        and isinstance(dst, RegistryRef)
        and (src.scheme, src.host) == (dst.scheme, dst.host)
    ):
        return src.repository
    return None


def _open_source(
    text: str,
    ref: RegistryRef | LayoutRef,
    credentials: Credentials | None,
    ca_bundle: Path | None,
    docker_config: Path | None,
    transfer: TransferPolicy,
) -> Source:
    return open_source(
        text,
        ref,
        docker_config=docker_config or docker_config_path(),
        ca_bundle=ca_bundle,
        credentials=credentials,
        policy=transfer,
    )


def _open_target(
    text: str,
    work_dir: Path,
    credentials: Credentials | None,
    ca_bundle: Path | None,
    docker_config: Path | None,
) -> Target:
    from exec_sandbox_assets.oci.targets import RegistryOptions, open_target

    options = RegistryOptions(
        username=credentials.username if credentials else None,
        password=credentials.password if credentials else None,
        ca_bundle=ca_bundle,
        auth_files=tuple(auth_files(docker_config or docker_config_path())),
    )
    return open_target(text, work_dir, options)


# --------------------------------------------------------------------------- reading


async def _plan(
    source: Source,
    tag: str,
    policy: TrustPolicy | None,
    platforms: Sequence[tuple[str, str]] | None,
    progress: ProgressCallback | None,
) -> Plan:
    """Read, verify and check one release (through the one `ReleaseReader`); nothing
    is written."""
    reader = ReleaseReader(source, policy, keep_signature=True)
    release = await reader.read(tag)
    version, digest = release.version, release.digest
    where = f"{source.name} tag {tag} (index {digest})"
    if progress is not None:
        progress(MirrorEvent("verified", version, digest, version))
    have = [platform_of(d, where) for d in release.index.manifests]
    _check_platforms(have, platforms, version, where)

    manifests: list[tuple[Descriptor, bytes]] = []
    blobs: dict[str, Blob] = {}
    for desc, part in await reader.platforms(release):
        manifests.append((desc, part.manifest))
        manifest = Manifest.from_bytes(part.manifest, f"{source.name} manifest {desc.digest}")
        config = manifest.config
        if config.digest not in blobs:
            blobs[config.digest] = Blob(
                config, f"config of {show(part.platform)}", await source.small_blob(config)
            )
        for layer in manifest.layers:
            blobs.setdefault(layer.digest, Blob(layer, layer.title or layer.digest))

    signature_manifest, signature_blobs = await _signature_copy(source, release, where)
    referrers, referrer_blobs = await _referrers_copy(source, digest, where)
    tags = (tag,) if tag != LATEST else (f"v{version}", LATEST)
    return Plan(
        version=version,
        tags=tags,
        index=release.data,
        index_digest=digest,
        manifests=manifests,
        blobs=list(blobs.values()),
        signature=signature_manifest,
        signature_blobs=signature_blobs,
        signed_by=release.key_ids,
        created=release.created,
        referrers=referrers,
        referrer_blobs=referrer_blobs,
    )


async def _signature_copy(
    source: Source, release: VerifiedIndex, where: str
) -> tuple[bytes | None, list[Blob]]:
    """The signature manifest to write and its blobs (config, payloads read already).

    Copied byte for byte when it holds signature layers only. A manifest that also
    lists other layers is unsigned junk a source may add (each up to the manifest
    cap, fetched whole): it is rebuilt from its signature layers alone, in cosign's
    layout, so the mirror neither fetches nor writes what no client reads.
    """
    signature = release.signature
    if signature is None:
        return None, []
    sig = Manifest.from_bytes(signature.manifest, f"{where} signature")
    wanted = {layer.payload_digest for layer in signature.layers}
    junk = [d for d in sig.layers if d.digest not in wanted]
    if junk:
        log.warning(
            "%s: the signature manifest lists %d layer(s) that are no signature; "
            "writing its %d signature(s) alone",
            where,
            len(junk),
            len(signature.layers),
        )
        rebuilt = build_signature_manifest(signature.pairs(), signature.key_ids())
        clean = Manifest.from_bytes(rebuilt.manifest, "rebuilt signature")
        return rebuilt.manifest, [
            Blob(clean.config, "signature blob", rebuilt.config),
            *(Blob(d, "signature blob", signature.payloads[d.digest]) for d in clean.layers),
        ]
    config = await source.small_blob(sig.config)
    return signature.manifest, [
        Blob(sig.config, "signature blob", config),
        *(Blob(d, "signature blob", signature.payloads[d.digest]) for d in sig.layers),
    ]


async def _referrers_copy(
    source: Source, subject_digest: str, where: str
) -> tuple[list[tuple[Descriptor, bytes]], list[Blob]]:
    """The bundle referrers of `subject_digest` to write, and their blobs (read whole:
    each is at most MAX_BUNDLE_SIZE). A referrer with anything else (another layer, a
    larger config) is not copied: the list is unsigned and clients read bundles only."""
    manifests: list[tuple[Descriptor, bytes]] = []
    blobs: dict[str, Blob] = {}
    for desc in await source.referrers(subject_digest, BUNDLE_MEDIA_TYPE):
        try:
            data = await source.manifest(desc)
            manifest = Manifest.from_bytes(data, f"{where} referrer {desc.digest}")
            bundles = referrer_layers(data, subject_digest, BUNDLE_MEDIA_TYPE, where)
            if not bundles:
                continue  # another kind of referrer, listed without its type
            parts = (manifest.config, *manifest.layers)
            if len(bundles) != len(manifest.layers) or any(d.size > MAX_BUNDLE_SIZE for d in parts):
                raise FormatError("holds more than small bundle blobs", desc.digest)
            for part in parts:
                if part.digest not in blobs:
                    blob = await source.small_blob(part, MAX_BUNDLE_SIZE)
                    blobs[part.digest] = Blob(part, "bundle", blob)
        except (AssetNotFoundError, AssetChecksumError, FormatError, SizeLimitError) as exc:
            log.warning("%s: bundle referrer %s not copied: %s", where, desc.digest, exc)
            continue
        manifests.append((desc, data))
    return manifests, list(blobs.values())


def _check_platforms(
    have: Sequence[tuple[str, str]],
    wanted: Sequence[tuple[str, str]] | None,
    version: str,
    where: str,
) -> None:
    if wanted is None:
        return
    listed = ", ".join(show(p) for p in have) or "none"
    missing = [p for p in dict.fromkeys(wanted) if p not in have]
    if missing:
        raise AssetNotFoundError(
            f"{where}: release {version} has no {', '.join(show(p) for p in missing)} "
            f"(it has: {listed})"
        )
    extra = [p for p in have if p not in wanted]
    if extra:
        # The index is signed as a whole and a registry refuses one whose platform
        # manifests are missing (MANIFEST_BLOB_UNKNOWN): the others are copied too.
        log.info(
            "the release also holds %s; copying every platform: its index is signed whole",
            ", ".join(show(p) for p in extra),
            extra={"where": where, "version": version},
        )


__all__ = [
    "CopiedRelease",
    "EventKind",
    "MirrorEvent",
    "MirrorResult",
    "ProgressCallback",
    "mirror",
    "mirror_async",
]
