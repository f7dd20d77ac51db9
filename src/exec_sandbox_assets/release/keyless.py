"""Keyless (Sigstore) release signatures: the signed statement, the identity policy, and
the verification of a bundle (docs/format.md §5.3, docs/keys.md).

A keyless release is signed by the release workflow of a repository at a release tag:
a Sigstore bundle v0.3 holding a DSSE envelope over an in-toto statement whose subject
is the release index digest, with a Fulcio certificate for the workflow's GitHub OIDC
identity and a Rekor entry proving when it was logged. Verification is offline, against
a `trusted_root.json` shipped in the package (or one the user names), never the copy
sigstore-python keeps in the user's cache (`Verifier.production(offline=True)`).

Pure except for sigstore-python, which costs ~0.5 s and ~30 MB to import: it is imported
inside `verify_bundle`, `WorkflowPolicy.verify` and `sign_bundle` only, so that the
scheduler's warm path (which checks a cache record, `trust_ids`) never loads it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exec_sandbox_assets.base import safejson
from exec_sandbox_assets.base.errors import ConfigError, FormatError, SignatureError
from exec_sandbox_assets.base.safetext import clean_text
from exec_sandbox_assets.oci.model import check_digest, is_digest
from exec_sandbox_assets.oci.referrers import BUNDLE_MEDIA_TYPE, MAX_BUNDLE_SIZE
from exec_sandbox_assets.release.signing import OPT_CREATED, OPT_VERSION, parse_timestamp
from exec_sandbox_assets.release.version import is_valid, same_version
from exec_sandbox_assets.release.workflows import (
    DEFAULT_TRUSTED_WORKFLOW,
    VENDORED_ROOT,
    Workflow,
    parse_workflows,
    root_fingerprint,
    root_path,
    trust_id,
    trust_ids,
)

if TYPE_CHECKING:  # only for annotations: loading cryptography is sigstore's job here
    from cryptography.x509 import Certificate

PREDICATE_TYPE = "https://sigstore.dev/cosign/sign/v1"
INTOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
GITHUB_ISSUER = "https://token.actions.githubusercontent.com"
# Each bundle costs a full verification (~5 ms); a release needs one or two.
MAX_BUNDLES = 16

# Fulcio's certificate extensions (https://github.com/sigstore/fulcio/blob/main/docs/oid-info.md)
_OID_ISSUER_V2 = "1.3.6.1.4.1.57264.1.8"
_OID_SOURCE_REPOSITORY_URI = "1.3.6.1.4.1.57264.1.12"

_TAG_REF = "@refs/tags/v"


# --------------------------------------------------------------------------- statement


def statement(index_digest: str, version: str, created: str) -> bytes:
    """The in-toto statement a keyless release signs, as cosign 3 signs an image: subject
    = the index digest (no name), predicate type cosign's sign/v1, and the release's
    version and creation time as subject annotations (the names the key-signed payload
    uses in `optional`, docs/format.md §5). Built by hand: sigstore-python's Statement
    model requires a subject name."""
    if not is_digest(index_digest) or not index_digest.startswith("sha256:"):
        raise ConfigError(f"invalid index digest {index_digest!r}")
    try:
        parse_timestamp(created)
    except ValueError:
        raise ConfigError(f"created {created!r} is not an RFC 3339 timestamp") from None
    doc = {
        "_type": STATEMENT_TYPE,
        "subject": [
            {
                "digest": {"sha256": index_digest.removeprefix("sha256:")},
                "annotations": {OPT_VERSION: version, OPT_CREATED: created},
            }
        ],
        "predicateType": PREDICATE_TYPE,
        "predicate": {},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


@dataclass(frozen=True)
class SignedStatement:
    index_digest: str
    version: str | None
    created: str | None


def parse_statement(data: bytes, index_digest: str, where: str) -> SignedStatement:
    """The claims of a verified statement about `index_digest` (FormatError otherwise).

    `verify_dsse` checks the envelope, not what it says: the subject and the predicate
    type are checked here."""
    doc = safejson.loads_object(data, where, what="in-toto statement", max_size=MAX_BUNDLE_SIZE)
    if doc.get("_type") != STATEMENT_TYPE:
        raise FormatError(
            f"statement type {clean_text(str(doc.get('_type')))} is not {STATEMENT_TYPE}", where
        )
    if doc.get("predicateType") != PREDICATE_TYPE:
        raise FormatError(
            f"predicate type {clean_text(str(doc.get('predicateType')))} is not {PREDICATE_TYPE}",
            where,
        )
    subjects = doc.get("subject")
    if not isinstance(subjects, list) or not subjects:
        raise FormatError("statement has no subject", where)
    wanted = index_digest.removeprefix("sha256:")
    found: list[str] = []
    for subject in subjects:
        digest = subject.get("digest") if isinstance(subject, dict) else None
        sha256 = digest.get("sha256") if isinstance(digest, dict) else None
        if not isinstance(sha256, str):
            continue
        found.append(f"sha256:{clean_text(sha256, 64)}")
        if sha256 == wanted:
            annotations = subject.get("annotations") or {}
            if not isinstance(annotations, dict):
                raise FormatError("subject annotations must be an object", where)
            version = _opt_str(annotations, OPT_VERSION, where)
            created = _opt_str(annotations, OPT_CREATED, where)
            if created is not None:
                try:
                    parse_timestamp(created)
                except ValueError:
                    raise FormatError(f"{OPT_CREATED} {created!r} is not RFC 3339", where) from None
            return SignedStatement(index_digest, version, created)
    raise FormatError(
        f"statement is about {', '.join(found) or 'no sha256 digest'}, not index {index_digest}",
        where,
    )


def _opt_str(obj: Mapping[str, Any], key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise FormatError(f"subject annotation {key} must be a string", where)
    return value


# --------------------------------------------------------------------------- identity


@dataclass(frozen=True)
class WorkflowPolicy:
    """A sigstore `VerificationPolicy`: the certificate is the GitHub Actions identity of
    `workflow` at tag `v{version}` exactly (any `v*` tag when `version` is None: a
    floating tag, whose signed version is compared with the tag afterwards).

    `policy.Identity` matches one SAN exactly and cannot say "a tag of this workflow",
    hence this class: issuer (OIDCIssuerV2), source repository and SAN."""

    workflow: Workflow
    version: str | None = None

    def wanted(self) -> str:
        tag = f"v{self.version.removeprefix('v')}" if self.version else "v<version>"
        return f"{self.workflow.url}@refs/tags/{tag}"

    def verify(self, cert: Certificate) -> None:
        from sigstore.errors import VerificationError

        problem = self.problem(cert)
        if problem:
            raise VerificationError(problem)

    def problem(self, cert: Certificate) -> str | None:
        """Why `cert` is not this identity, or None."""
        issuer = extension_text(cert, _OID_ISSUER_V2)
        if issuer != GITHUB_ISSUER:
            return f"issuer {clean_text(str(issuer))} is not {GITHUB_ISSUER}"
        repository = extension_text(cert, _OID_SOURCE_REPOSITORY_URI)
        if repository != self.workflow.repository:
            return (
                f"source repository {clean_text(str(repository))} is not {self.workflow.repository}"
            )
        san = identity_of(cert)
        if san is None:
            return "certificate names no single URI identity"
        if self.version is not None:
            if san != self.wanted():
                return "identity is not the trusted workflow at the release's tag"
            return None
        ref_version = tag_version(san, self.workflow)
        if ref_version is None:
            return "identity is not the trusted workflow at a v<version> tag"
        return None


def tag_version(identity: str, workflow: Workflow) -> str | None:
    """X when `identity` is `workflow` at `refs/tags/vX` with X a valid version."""
    prefix = workflow.url + _TAG_REF
    if not identity.startswith(prefix):
        return None
    version = identity[len(prefix) :]
    return version if is_valid(version) else None


def identity_of(cert: Certificate) -> str | None:
    """The certificate's one SAN URI (a GitHub Actions identity), or None."""
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if len(uris) == 1 and len(list(san)) == 1 else None


def extension_text(cert: Certificate, oid: str) -> str | None:
    """A Fulcio v2 extension's value (a DER UTF8String), or None when absent or not one."""
    from cryptography import x509

    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid)).value
    except x509.ExtensionNotFound:
        return None
    raw = getattr(ext, "value", b"")
    return der_utf8(raw) if isinstance(raw, bytes) else None


def der_utf8(raw: bytes) -> str | None:
    """The text of a DER UTF8String (tag 0x0C), or None."""
    if len(raw) < 2 or raw[0] != 0x0C:
        return None
    length, start = raw[1], 2
    if length & 0x80:
        count = length & 0x7F
        if count not in (1, 2) or len(raw) < 2 + count:
            return None
        length, start = int.from_bytes(raw[2 : 2 + count], "big"), 2 + count
    if len(raw) != start + length:
        return None
    try:
        return raw[start:].decode()
    except UnicodeDecodeError:
        return None


# --------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class KeylessSignature:
    """A bundle that verified: who signed (the workflow at a tag) and what it says."""

    identity: str  # the certificate's SAN: WORKFLOW@refs/tags/vX
    workflow: str
    issuer: str
    index_digest: str
    version: str | None
    created: str | None
    trust_id: str  # as cache records name it (`trust_id`)
    log_index: int | None = None


def verify_bundle(
    bundle_bytes: bytes,
    *,
    index_digest: str,
    version: str | None,
    workflows: Sequence[Workflow],
    trusted_root: Path | None,
    where: str = "",
) -> KeylessSignature:
    """Verify one Sigstore bundle over the release index `index_digest`, signed by one of
    `workflows` at tag `v{version}` (any `v*` tag when `version` is None, whose version must
    then be the signed one). Raises `SignatureError` in one line naming the identity found
    and the one wanted; returns what was signed."""
    check_digest(index_digest, where)
    if not workflows:
        raise ConfigError("no trusted workflow configured for keyless verification")
    where = where or f"index {index_digest}"
    policies = [WorkflowPolicy(w, version) for w in workflows]
    wanted = " or ".join(p.wanted() for p in policies)
    if len(bundle_bytes) > MAX_BUNDLE_SIZE:
        raise SignatureError(
            f"{where}: keyless signature refused: bundle of {len(bundle_bytes)} bytes exceeds "
            f"{MAX_BUNDLE_SIZE} (wanted {wanted})"
        )
    root = root_path(trusted_root)
    fingerprint = root_fingerprint(root)

    from sigstore.errors import Error as SigstoreError
    from sigstore.models import Bundle, TrustedRoot
    from sigstore.verify import Verifier

    found = "an unreadable bundle"
    try:
        bundle = Bundle.from_json(bundle_bytes)
        cert = bundle.signing_certificate
        found = _describe(cert)
        try:
            trust = TrustedRoot.from_file(str(root))
        except Exception as exc:  # pydantic/json errors of a broken root file
            raise ConfigError(f"Sigstore trusted root {root} is unusable: {exc}") from None
        matched = _matching(policies, cert)
        payload_type, payload = Verifier(trusted_root=trust).verify_dsse(bundle, matched)
    except (SigstoreError, ValueError) as exc:
        raise _refused(where, found, wanted, clean_text(str(exc), 300)) from None
    if payload_type != INTOTO_PAYLOAD_TYPE:
        raise _refused(where, found, wanted, f"payload type {clean_text(payload_type)!r}")
    try:
        signed = parse_statement(payload, index_digest, f"{where} statement")
    except FormatError as exc:
        raise _refused(where, found, wanted, str(exc)) from None
    identity = identity_of(cert) or ""
    tag = tag_version(identity, matched.workflow)
    if signed.version is None or tag is None or not same_version(tag, signed.version):
        raise _refused(
            where,
            found,
            wanted,
            f"signed version {signed.version!r} is not the tag's version {tag!r}",
        )
    return KeylessSignature(
        identity=identity,
        workflow=matched.workflow.url,
        issuer=GITHUB_ISSUER,
        index_digest=index_digest,
        version=signed.version,
        created=signed.created,
        trust_id=trust_id(matched.workflow, fingerprint),
        log_index=bundle.log_entry._inner.log_index,
    )


def _matching(policies: Sequence[WorkflowPolicy], cert: Certificate) -> WorkflowPolicy:
    """The policy whose workflow the certificate names (the first one when none: its
    `verify` then fails inside the verifier, after the chain and log checks)."""
    identity = identity_of(cert) or ""
    for policy in policies:
        if identity.startswith(policy.workflow.url + "@"):
            return policy
    return policies[0]


def _describe(cert: Certificate) -> str:
    identity = identity_of(cert)
    issuer = extension_text(cert, _OID_ISSUER_V2)
    return (
        f"{clean_text(identity or 'no URI identity', 300)} "
        f"(issuer {clean_text(issuer or 'unknown', 120)})"
    )


def _refused(where: str, found: str, wanted: str, reason: str) -> SignatureError:
    return SignatureError(
        f"{where}: keyless signature refused: signed by {found}, wanted {wanted} "
        f"(issuer {GITHUB_ISSUER}): {reason}"
    )


# --------------------------------------------------------------------------- sign


def sign_bundle(statement_bytes: bytes, identity_token: str, *, staging: bool = False) -> bytes:
    """Sign `statement_bytes` (from `statement`) keyless with the OIDC `identity_token`
    (in GitHub Actions: `sigstore.oidc.detect_credential()`, with `id-token: write`),
    through Sigstore's public-good instance; returns the bundle v0.3 JSON.

    The statement's bytes are signed as they are: sigstore-python's `Statement` would
    re-serialize a model that requires a subject name."""
    from sigstore.models import ClientTrustConfig
    from sigstore.oidc import IdentityToken
    from sigstore.sign import SigningContext

    config = ClientTrustConfig.staging() if staging else ClientTrustConfig.production()
    context = SigningContext.from_trust_config(config)
    with context.signer(IdentityToken(identity_token)) as signer:
        bundle = signer.sign_dsse(raw_statement(statement_bytes))
    return bundle.to_json().encode()


def raw_statement(statement_bytes: bytes) -> Any:
    """A sigstore `dsse.Statement` over these exact bytes (only `_contents` is signed)."""
    from sigstore import dsse

    parse_statement_shape(statement_bytes)
    stmt = dsse.Statement.__new__(dsse.Statement)
    stmt._contents = statement_bytes
    return stmt


def parse_statement_shape(statement_bytes: bytes) -> None:
    """Refuse to sign what is not one of our statements (ConfigError)."""
    doc = safejson.loads_object(statement_bytes, "statement to sign", what="in-toto statement")
    subjects = doc.get("subject")
    digest = None
    if isinstance(subjects, list) and len(subjects) == 1 and isinstance(subjects[0], dict):
        digests = subjects[0].get("digest")
        digest = digests.get("sha256") if isinstance(digests, dict) else None
    if not isinstance(digest, str):
        raise ConfigError("statement to sign has no single sha256 subject")
    try:
        parse_statement(statement_bytes, f"sha256:{digest}", "statement to sign")
    except FormatError as exc:
        raise ConfigError(str(exc)) from None


__all__ = [
    "BUNDLE_MEDIA_TYPE",
    "DEFAULT_TRUSTED_WORKFLOW",
    "GITHUB_ISSUER",
    "INTOTO_PAYLOAD_TYPE",
    "MAX_BUNDLES",
    "MAX_BUNDLE_SIZE",
    "PREDICATE_TYPE",
    "VENDORED_ROOT",
    "KeylessSignature",
    "Workflow",
    "WorkflowPolicy",
    "parse_workflows",
    "root_fingerprint",
    "sign_bundle",
    "statement",
    "trust_id",
    "trust_ids",
    "verify_bundle",
]
