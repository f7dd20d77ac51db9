"""The publisher's keyless signature (docs/format.md §8, docs/publishing.md).

    statement (release.keyless) -> signer (Sigstore: the workflow's OIDC identity)
        -> bundle, verified with every given trusted root and the workflow policy
        -> per target: bundle blob + referrer manifest (subject = the index) + the
           `sha256-<hex>` tag, read back through the client's reader with each root
           before any tag moves (publish/signatures.py `read_back`)
        -> the GitHub Release folder's `oci-index.sigstore.json`

A bundle a target already holds for this very release (verifying under the same
policy and roots, with the same signed version and created) is kept and nothing is
signed again: re-running changes no digest, as with keys. The signer is injected:
production signs through Sigstore's public instance with the ambient OIDC token
(`ambient_signer`); tests pass their own instance's bundle maker, and `--keyless-bundle`
a bundle made elsewhere (it is verified like any other).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from exec_sandbox_assets.base.errors import (
    AssetDownloadError,
    AssetNotFoundError,
    ConfigError,
    FormatError,
    SignatureError,
    TrustError,
)
from exec_sandbox_assets.oci.model import (
    EMPTY_JSON,
    MEDIA_TYPE_EMPTY,
    MEDIA_TYPE_INDEX,
    MEDIA_TYPE_MANIFEST,
    Descriptor,
    sha256_digest,
)
from exec_sandbox_assets.oci.referrers import (
    ANN_BUNDLE_CONTENT,
    ANN_BUNDLE_PREDICATE_TYPE,
    ANN_CREATED,
    BUNDLE_MEDIA_TYPE,
    referrer_manifest,
)
from exec_sandbox_assets.oci.target import Target
from exec_sandbox_assets.publish.signatures import run_async
from exec_sandbox_assets.release import keyless
from exec_sandbox_assets.sources.target import TargetSource

log = logging.getLogger(__name__)

#: statement bytes -> Sigstore bundle JSON
Signer = Callable[[bytes], bytes]


@dataclass(frozen=True)
class KeylessOptions:
    """How to sign keyless and what the new bundle must verify under.

    `roots`: trusted roots to verify with (None = the one packaged with this version);
    the release job adds the root of the oldest client release still supported, so a
    Sigstore key rotation that client does not know fails the release, not the users."""

    signer: Signer = field(repr=False)
    workflows: tuple[keyless.Workflow, ...] = (keyless.Workflow(keyless.DEFAULT_TRUSTED_WORKFLOW),)
    roots: tuple[Path | None, ...] = (None,)


@dataclass(frozen=True)
class KeylessBundle:
    """The bundle of this release and its referrer manifest, verified."""

    bundle: bytes = field(repr=False)
    manifest: bytes = field(repr=False)
    identity: str

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest)


def ambient_signer(statement: bytes) -> bytes:
    """Sign through Sigstore's public instance with the CI job's OIDC identity (GitHub
    Actions: the job needs `permissions: id-token: write`)."""
    import requests
    from sigstore.errors import Error as SigstoreError
    from sigstore.oidc import IdentityError, detect_credential

    hint = "in GitHub Actions the publish job needs `permissions: id-token: write`"
    try:
        token = detect_credential()
    except IdentityError as exc:
        raise ConfigError(f"--keyless: no usable OIDC credential ({exc}); {hint}") from None
    if token is None:
        raise ConfigError(f"--keyless: no ambient OIDC credential found; {hint}")
    try:
        return keyless.sign_bundle(statement, token)
    except (SigstoreError, requests.RequestException) as exc:
        # Fulcio or Rekor refused or could not be reached: nothing was written yet.
        raise AssetDownloadError(f"--keyless: signing through Sigstore failed: {exc}") from None


def file_signer(path: Path) -> Signer:
    """A 'signer' handing out a bundle made elsewhere (`--keyless-bundle FILE`)."""

    def sign(_statement: bytes) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read keyless bundle {path}: {exc.strerror}") from None

    return sign


def verify(
    options: KeylessOptions,
    bundle: bytes,
    index_digest: str,
    version: str,
    created: str,
    where: str,
) -> keyless.KeylessSignature:
    """The bundle verifies with every root, under the workflow policy, for exactly this
    release (signed version and created); SignatureError otherwise."""
    signed: keyless.KeylessSignature | None = None
    for root in options.roots:
        signed = keyless.verify_bundle(
            bundle,
            index_digest=index_digest,
            version=version,
            workflows=options.workflows,
            trusted_root=root,
            where=f"{where} (trusted root {root or 'packaged'})",
        )
    assert signed is not None, "KeylessOptions.roots is never empty"
    if signed.created != created:
        raise SignatureError(f"{where}: signed created {signed.created!r}, expected {created!r}")
    return signed


def referrer_of(bundle: bytes, index: bytes, created: str) -> bytes:
    """The bundle's referrer manifest, as cosign 3 writes it (docs/format.md §8)."""
    return referrer_manifest(
        Descriptor(MEDIA_TYPE_INDEX, sha256_digest(index), len(index)),
        BUNDLE_MEDIA_TYPE,
        [Descriptor.for_bytes(BUNDLE_MEDIA_TYPE, bundle)],
        {
            ANN_BUNDLE_CONTENT: "dsse-envelope",
            ANN_BUNDLE_PREDICATE_TYPE: keyless.PREDICATE_TYPE,
            ANN_CREATED: created,
        },
    )


def _held(target: Target, index_digest: str) -> list[bytes]:
    try:
        return run_async(TargetSource(target).bundles(index_digest))
    except (TrustError, FormatError, AssetNotFoundError) as exc:
        log.debug("no bundle kept from %s: %s", target.name, exc)
        return []


def plan_bundle(
    options: KeylessOptions,
    targets: Sequence[Target],
    index: bytes,
    version: str,
    created: str,
) -> KeylessBundle:
    """A bundle a target already holds for this release, else a new one from the signer;
    verified either way before anything is written."""
    index_digest = sha256_digest(index)
    for target in targets:
        for bundle in _held(target, index_digest):
            try:
                signed = verify(options, bundle, index_digest, version, created, target.name)
            except (SignatureError, ConfigError) as exc:
                log.debug("bundle on %s not kept: %s", target.name, exc)
                continue
            log.info("keeping the keyless signature %s already on %s", signed.identity, target.name)
            return KeylessBundle(bundle, referrer_of(bundle, index, created), signed.identity)
    statement = keyless.statement(index_digest, version, created)
    bundle = options.signer(statement)
    signed = verify(options, bundle, index_digest, version, created, "the new keyless signature")
    log.info("signed %s keyless as %s", index_digest, signed.identity)
    return KeylessBundle(bundle, referrer_of(bundle, index, created), signed.identity)


def store(target: Target, signed: KeylessBundle, index_digest: str) -> None:
    """Blobs, the referrer manifest, the subject's `sha256-<hex>` tag (put_referrer)."""
    target.push_bytes(EMPTY_JSON, MEDIA_TYPE_EMPTY)
    target.push_bytes(signed.bundle, BUNDLE_MEDIA_TYPE)
    target.put_referrer(signed.manifest, MEDIA_TYPE_MANIFEST, index_digest)


__all__ = [
    "KeylessBundle",
    "KeylessOptions",
    "Signer",
    "ambient_signer",
    "file_signer",
    "plan_bundle",
    "referrer_of",
    "store",
    "verify",
]
