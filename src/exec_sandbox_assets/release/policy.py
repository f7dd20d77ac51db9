"""The trust policy: whether a release index is accepted (docs/format.md §5.2).

Pure, as python-tuf's trusted metadata set: it takes bytes already fetched (the index
digest, the signature payloads) and state already read (`RollbackState`, what was
accepted before under the tag), and returns a `Verdict` or raises a `TrustError`. No
network, no files, no environment: the `ReleaseReader` (sources/reader.py) does the
fetching and the caller keeps the state. `accept_index` is the one function that
decides whether a release is accepted; every reader (client, mirror, inspect, the
publisher's read-back) goes through it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from exec_sandbox_assets.base.errors import (
    ConfigError,
    FormatError,
    NoTrustedKeysError,
    RollbackError,
    SignatureError,
    VersionMismatchError,
)
from exec_sandbox_assets.release.catalog import ANN_CREATED, ANN_VERSION
from exec_sandbox_assets.release.keyless import (
    MAX_BUNDLES,
    KeylessSignature,
    Workflow,
    verify_bundle,
)
from exec_sandbox_assets.release.signing import SignedPayload, parse_payload, parse_timestamp
from exec_sandbox_assets.release.version import is_valid, same_version, version_of_tag

if TYPE_CHECKING:  # keys are objects here; cryptography is loaded by whoever made them
    from exec_sandbox_assets.release.keys import PublicKey

logger = logging.getLogger(__name__)

_HOW_TO_CONFIGURE = (
    "configure a trusted release workflow (keyless: EXEC_SANDBOX_TRUSTED_WORKFLOWS="
    "https://github.com/OWNER/REPO/.github/workflows/FILE.yml, --trusted-workflow URL, "
    "configure(trusted_workflows=[...]); an empty value disables it) or a trusted public "
    "key (PEM 'PUBLIC KEY', as `cosign verify --key` takes): "
    "set EXEC_SANDBOX_TRUSTED_KEYS=/path/key.pub, or give --trusted-key FILE on the "
    "command line, or configure(trusted_keys=[...]) in Python; "
    "to skip verification anyway (insecure), set EXEC_SANDBOX_INSECURE_SKIP_VERIFY=1"
)


# --------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class TrustPolicy:
    """Who may vouch for a release: trusted keys and trusted release workflows (keyless,
    verified against the Sigstore root `sigstore_root`, None = the one in the package).
    `threshold` counts distinct keys and distinct workflows together."""

    keys: tuple[PublicKey, ...]
    threshold: int = 1
    allow_downgrade: bool = False
    workflows: tuple[Workflow, ...] = ()
    sigstore_root: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", tuple(self.keys))
        object.__setattr__(self, "workflows", tuple(dict.fromkeys(self.workflows)))
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int):
            raise ConfigError(f"signature threshold must be an integer, not {self.threshold!r}")
        if self.threshold < 1:
            raise ConfigError(f"signature threshold must be at least 1, not {self.threshold}")
        distinct = len({k.key_id for k in self.keys}) + len(self.workflows)
        if self.trusts_anyone and self.threshold > distinct:
            raise ConfigError(
                f"signature threshold {self.threshold} exceeds the {distinct} distinct "
                "trusted key(s) and workflow(s) configured; it could never be met"
            )

    @property
    def trusts_anyone(self) -> bool:
        return bool(self.keys or self.workflows)


@dataclass(frozen=True)
class VerifiedRelease:
    index_digest: str
    version: str | None
    created: str | None
    key_ids: tuple[str, ...]
    identities: tuple[KeylessSignature, ...] = ()


def load_policy(
    key_files: Sequence[Path],
    threshold: int = 1,
    allow_downgrade: bool = False,
    workflows: Sequence[Workflow] = (),
    sigstore_root: Path | None = None,
) -> TrustPolicy:
    """A policy from PEM public key files (ConfigError naming an unreadable one) and
    trusted release workflows."""
    keys: tuple[PublicKey, ...] = ()
    if key_files:
        from exec_sandbox_assets.release.keys import load_public_key_file  # cryptography

        keys = tuple(load_public_key_file(Path(p)) for p in key_files)
    return TrustPolicy(
        keys=keys,
        threshold=threshold,
        allow_downgrade=allow_downgrade,
        workflows=tuple(workflows),
        sigstore_root=sigstore_root,
    )


def require_keys(policy: TrustPolicy, where: str) -> None:
    """Fail closed, before any remote byte is read, when nobody is trusted."""
    if not policy.trusts_anyone:
        raise NoTrustedKeysError(
            f"{where}: no trusted key is configured (nor a trusted release workflow); "
            f"{_HOW_TO_CONFIGURE}"
        )


def _untrusted_signers(
    signatures: Sequence[bytes], claimed: Mapping[bytes, str], keys: Sequence[PublicKey]
) -> str:
    """Who made the signatures no trusted key verified, as their layers name them: the
    claim is unsigned, so it only says which key to ask for (or that one is damaged)."""
    trusted = {k.key_id for k in keys}
    named = [claimed[s] for s in signatures if s in claimed]
    others = list(dict.fromkeys(k for k in named if k not in trusted))
    forged = list(dict.fromkeys(k for k in named if k in trusted))
    unnamed = sum(s not in claimed for s in signatures)
    parts = []
    if others:
        parts.append(
            "signed by key(s) "
            + ", ".join(k[:16] for k in others)
            + ", not trusted here (as the signature manifest names them)"
        )
    if forged:
        parts.append(
            "a signature naming trusted key(s) "
            + ", ".join(k[:16] for k in forged)
            + " does not verify with it (damaged or forged)"
        )
    if unnamed:
        parts.append(
            f"{unnamed} signature(s) name no key (written by cosign or an older publisher)"
        )
    return "".join(f"; {p}" for p in parts)


def verify_index(
    policy: TrustPolicy,
    index_digest: str,
    signatures: Sequence[tuple[bytes, bytes]],
    *,
    bundles: Sequence[bytes] = (),
    expected_version: str | None,
    newest_accepted_created: str | None,
    claimed_key_ids: Mapping[bytes, str] | None = None,
    where: str,
) -> VerifiedRelease:
    """Accept the index `index_digest` (computed by the caller over the bytes it fetched)
    or raise. `signatures` are (payload bytes, raw signature) pairs; `bundles` Sigstore
    bundles (keyless signatures), checked only when the policy trusts a workflow;
    `claimed_key_ids` maps a signature to the key id its layer names, for the error only."""
    require_keys(policy, f"{where}: refusing unverified remote content (index {index_digest})")
    keys = list({k.key_id: k for k in policy.keys}.values())

    # Verify before parsing: untrusted bytes are only interpreted once a trusted key
    # has vouched for them.
    accepted: dict[str, list[SignedPayload]] = {}
    other_digest = 0
    unverified: list[bytes] = []  # signatures no trusted key made
    for n, (payload, signature) in enumerate(signatures):
        signers = [k for k in keys if k.verify(signature, payload)]
        if not signers:
            unverified.append(signature)
            continue
        try:
            parsed = parse_payload(payload, f"{where} signature {n}")
        except FormatError as exc:
            logger.debug(
                "%s: signed payload unparsable: %s",
                where,
                exc,
                extra={"where": where, "error": str(exc)},
            )
            continue
        if parsed.digest != index_digest:
            other_digest += 1
            continue
        for key in signers:
            accepted.setdefault(key.key_id, []).append(parsed)

    identities, refusals = _keyless(policy, index_digest, bundles, expected_version)

    if len(accepted) + len(identities) < policy.threshold:
        raise SignatureError(
            _too_few(policy, where, index_digest, (len(accepted), len(identities)))
            + f" ({len(signatures)} signature(s)"
            + (f" and {len(bundles)} Sigstore bundle(s)" if policy.workflows else "")
            + " checked"
            + (
                f"; {other_digest} valid signature(s) were for another digest"
                if other_digest
                else ""
            )
            + f"); {_trusted(policy)}"
            + _untrusted_signers(unverified, claimed_key_ids or {}, keys)
            + "".join(f"; {r}" for r in refusals)
        )

    claims = {(p.version, p.created) for payloads in accepted.values() for p in payloads}
    claims.update((s.version, s.created) for s in identities)
    if len(claims) > 1:
        shown = "; ".join(f"version={v!r} created={c!r}" for v, c in sorted(claims, key=str))
        raise SignatureError(
            f"{where}: valid signatures on index {index_digest} disagree on the release "
            f"they describe ({shown}); refusing"
        )
    ((version, created),) = claims

    if expected_version is not None and (
        version is None or version.removeprefix("v") != expected_version.removeprefix("v")
    ):
        raise VersionMismatchError(
            f"{where}: index {index_digest} is signed as version {version!r}, but version "
            f"{expected_version!r} was asked for; refusing a release served under another "
            "release's tag"
        )

    if newest_accepted_created is not None and not policy.allow_downgrade:
        _check_rollback(index_digest, created, newest_accepted_created, where)

    ordered = tuple(k.key_id for k in keys if k.key_id in accepted)
    return VerifiedRelease(index_digest, version, created, ordered, identities)


def _keyless(
    policy: TrustPolicy, index_digest: str, bundles: Sequence[bytes], expected: str | None
) -> tuple[tuple[KeylessSignature, ...], list[str]]:
    """The distinct trusted workflows whose bundles verified, and why others did not."""
    if not policy.workflows:
        return (), []
    by_workflow: dict[str, KeylessSignature] = {}
    refusals: list[str] = []
    for n, bundle in enumerate(bundles[:MAX_BUNDLES]):
        try:
            signed = verify_bundle(
                bundle,
                index_digest=index_digest,
                version=expected,
                workflows=policy.workflows,
                trusted_root=policy.sigstore_root,
                where=f"bundle {n}",
            )
        except SignatureError as exc:
            refusals.append(str(exc))
            continue
        by_workflow.setdefault(signed.workflow, signed)
    return tuple(by_workflow.values()), refusals


def _too_few(policy: TrustPolicy, where: str, index_digest: str, counts: tuple[int, int]) -> str:
    keys, workflows = counts
    found = f" and {workflows} trusted workflow(s)" if policy.workflows else ""
    return (
        f"{where}: index {index_digest} has valid signatures from {keys} trusted key(s)"
        f"{found}, {policy.threshold} required"
    )


def _trusted(policy: TrustPolicy) -> str:
    trusted = []
    if policy.keys:
        trusted.append("trusted keys tried: " + ", ".join(k.describe() for k in policy.keys))
    if policy.workflows:
        trusted.append("trusted workflows: " + ", ".join(w.url for w in policy.workflows))
    return "; ".join(trusted)


def _check_rollback(index_digest: str, created: str | None, newest: str, where: str) -> None:
    how = "to accept it, set EXEC_SANDBOX_ALLOW_DOWNGRADE=1 or pass allow_downgrade=True"
    try:
        newest_at = parse_timestamp(newest)
    except ValueError:
        raise ConfigError(
            f"recorded newest accepted release time {newest!r} is not RFC 3339"
        ) from None
    if created is None:
        raise RollbackError(
            f"{where}: index {index_digest} carries no signed creation time, so it cannot "
            f"be shown to be newer than the release accepted before ({newest}); {how}"
        )
    # parse_payload already checked the format of `created`.
    if parse_timestamp(created) < newest_at:
        raise RollbackError(
            f"{where}: index {index_digest} was created {created}, older than the release "
            f"accepted before ({newest}): possible rollback; {how}"
        )


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class RollbackState:
    """What was accepted before under a floating tag: kept per tag, across all sources
    (docs/format.md §5.2), so an outage of the source that served the newest release
    cannot make an older one acceptable from another."""

    created: str | None = None  # the newest signed creation time accepted
    version: str | None = None
    digest: str | None = None
    source: str | None = None

    @classmethod
    def from_json(cls, obj: Mapping[str, object] | None) -> RollbackState:
        """From a state file's object (this format, or the old per-source `{"created"}`);
        fields of the wrong type are dropped, as a missing file is."""
        if not obj:
            return cls()

        def text(key: str) -> str | None:
            value = obj.get(key)
            return value if isinstance(value, str) else None

        return cls(text("created"), text("version"), text("digest"), text("source"))

    def to_json(self) -> dict[str, str]:
        fields = {
            "created": self.created,
            "version": self.version,
            "digest": self.digest,
            "source": self.source,
        }
        return {k: v for k, v in fields.items() if v is not None}

    @staticmethod
    def newest(states: Iterable[RollbackState]) -> RollbackState:
        """The state with the latest valid creation time (merging old per-source files)."""
        best = RollbackState()
        for state in states:
            if state.created is None:
                continue
            try:
                at = parse_timestamp(state.created)
            except ValueError:
                if best.created is None:
                    best = state  # kept: accept_index reports it, rather than forget it
                continue
            try:
                better = best.created is None or at > parse_timestamp(best.created)
            except ValueError:
                better = True
            if better:
                best = state
        return best

    def after(self, accepted: RollbackState) -> RollbackState:
        """The state to record once `accepted` was: it never moves back in time."""
        if accepted.created is None:
            return self
        return RollbackState.newest((accepted, self)) if self.created else accepted


# --------------------------------------------------------------------------- verdict


@dataclass(frozen=True)
class Verdict:
    """An accepted release index: what it is, and who vouched for it."""

    tag: str
    index_digest: str
    version: str  # bound to the tag, without the leading "v"
    created: str | None
    key_ids: tuple[str, ...]  # trusted keys whose signatures counted; () when unverified
    identities: tuple[KeylessSignature, ...] = ()  # trusted workflows whose bundles counted

    @property
    def signed(self) -> bool:
        return bool(self.key_ids or self.identities)

    @property
    def signers(self) -> tuple[str, ...]:
        """What a cache record names as having admitted the release (cache.records)."""
        return self.key_ids + tuple(s.trust_id for s in self.identities)


def accept_index(
    policy: TrustPolicy | None,
    *,
    tag: str,
    index_digest: str,
    signatures: Sequence[tuple[bytes, bytes]],
    bundles: Sequence[bytes] = (),
    annotations: Callable[[], Mapping[str, str]],
    expected_version: str | None = None,
    rollback: RollbackState | None = None,
    claimed_key_ids: Mapping[bytes, str] | None = None,
    where: str,
) -> Verdict:
    """THE decision whether the index `index_digest`, read under `tag`, is accepted.

    `policy` None means verification was switched off (insecure; the caller logged it):
    the index's own annotations then say what it is. Otherwise `verify_index` decides
    (threshold over keys and workflows, signed digest, signed version, rollback against
    `rollback`); `bundles` are the index's Sigstore bundles. Either way
    the release's version must be a valid one and, for a `vX` tag (or an explicit
    `expected_version`), be X. `annotations` parses the index: it is called only after
    the signatures verified, so untrusted index bytes are read once a key vouched.
    `claimed_key_ids` (signature -> the key id its layer names) only words an error.
    """
    expected = expected_version if expected_version is not None else version_of_tag(tag)
    key_ids: tuple[str, ...] = ()
    identities: tuple[KeylessSignature, ...] = ()
    if policy is None:
        annotated = annotations()
        version, created = annotated.get(ANN_VERSION), annotated.get(ANN_CREATED)
    else:
        verified = verify_index(
            policy,
            index_digest,
            signatures,
            bundles=bundles,
            expected_version=expected,
            newest_accepted_created=rollback.created if rollback else None,
            claimed_key_ids=claimed_key_ids,
            where=where,
        )
        version = verified.version or annotations().get(ANN_VERSION)
        created, key_ids, identities = verified.created, verified.key_ids, verified.identities
    bound = bind_version(version, expected, where)
    return Verdict(tag, index_digest, bound, created, key_ids, identities)


def bind_version(version: str | None, expected: str | None, where: str) -> str:
    """The release's version (without "v"), checked against the one the tag names."""
    if not version:
        raise FormatError(f"index has no {ANN_VERSION} annotation", where)
    if expected is not None and not same_version(version, expected):
        raise VersionMismatchError(
            f"{where}: holds release {version}, but {expected.removeprefix('v')} was asked for"
        )
    bare = version.removeprefix("v")
    if not is_valid(bare):
        raise FormatError(f"release version {version[:140]!r} is not a valid version", where)
    return bare


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class SignatureFinding:
    """What one signature layer says, for a report (`inspect`): not a decision."""

    payload_digest: str
    signed_by: tuple[str, ...]  # trusted key ids whose check passed
    payload: SignedPayload | None  # None when the payload does not parse
    error: str | None = None


def describe_signature(
    keys: Sequence[PublicKey], payload_digest: str, payload: bytes, signature: bytes, where: str
) -> SignatureFinding:
    signed_by = tuple(k.key_id for k in keys if k.verify(signature, payload))
    try:
        parsed = parse_payload(payload, where)
    except FormatError as exc:
        return SignatureFinding(payload_digest, signed_by, None, str(exc))
    return SignatureFinding(payload_digest, signed_by, parsed)
