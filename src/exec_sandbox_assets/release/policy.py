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
from exec_sandbox_assets.release.signing import SignedPayload, parse_payload, parse_timestamp
from exec_sandbox_assets.release.version import is_valid, same_version, version_of_tag

if TYPE_CHECKING:  # keys are objects here; cryptography is loaded by whoever made them
    from exec_sandbox_assets.release.keys import PublicKey

logger = logging.getLogger(__name__)

_HOW_TO_CONFIGURE = (
    "configure a trusted public key (PEM 'PUBLIC KEY', as `cosign verify --key` takes): "
    "set EXEC_SANDBOX_TRUSTED_KEYS=/path/key.pub, or give --trusted-key FILE on the "
    "command line, or configure(trusted_keys=[...]) in Python; "
    "to skip verification anyway (insecure), set EXEC_SANDBOX_INSECURE_SKIP_VERIFY=1"
)


# --------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class TrustPolicy:
    keys: tuple[PublicKey, ...]
    threshold: int = 1
    allow_downgrade: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", tuple(self.keys))
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int):
            raise ConfigError(f"signature threshold must be an integer, not {self.threshold!r}")
        if self.threshold < 1:
            raise ConfigError(f"signature threshold must be at least 1, not {self.threshold}")
        distinct = len({k.key_id for k in self.keys})
        if self.keys and self.threshold > distinct:
            raise ConfigError(
                f"signature threshold {self.threshold} exceeds the {distinct} distinct "
                "trusted key(s) configured; it could never be met"
            )


@dataclass(frozen=True)
class VerifiedRelease:
    index_digest: str
    version: str | None
    created: str | None
    key_ids: tuple[str, ...]


def load_policy(
    key_files: Sequence[Path], threshold: int = 1, allow_downgrade: bool = False
) -> TrustPolicy:
    """A policy from PEM public key files (ConfigError naming an unreadable one)."""
    from exec_sandbox_assets.release.keys import load_public_key_file  # cryptography

    return TrustPolicy(
        keys=tuple(load_public_key_file(Path(p)) for p in key_files),
        threshold=threshold,
        allow_downgrade=allow_downgrade,
    )


def require_keys(policy: TrustPolicy, where: str) -> None:
    """Fail closed, before any remote byte is read, when no trusted key is configured."""
    if not policy.keys:
        raise NoTrustedKeysError(f"{where}: no trusted key is configured; {_HOW_TO_CONFIGURE}")


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
    expected_version: str | None,
    newest_accepted_created: str | None,
    claimed_key_ids: Mapping[bytes, str] | None = None,
    where: str,
) -> VerifiedRelease:
    """Accept the index `index_digest` (computed by the caller over the bytes it fetched)
    or raise. `signatures` are (payload bytes, raw signature) pairs; `claimed_key_ids`
    maps a signature to the key id its layer names, for the error only."""
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

    if len(accepted) < policy.threshold:
        tried = ", ".join(k.describe() for k in keys)
        note = (
            f"; {other_digest} valid signature(s) were for another digest" if other_digest else ""
        )
        raise SignatureError(
            f"{where}: index {index_digest} has valid signatures from {len(accepted)} "
            f"trusted key(s), {policy.threshold} required ({len(signatures)} signature(s) "
            f"checked{note}); trusted keys tried: {tried}"
            f"{_untrusted_signers(unverified, claimed_key_ids or {}, keys)}"
        )

    claims = {(p.version, p.created) for payloads in accepted.values() for p in payloads}
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
    return VerifiedRelease(index_digest, version, created, ordered)


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

    @property
    def signed(self) -> bool:
        return bool(self.key_ids)


def accept_index(
    policy: TrustPolicy | None,
    *,
    tag: str,
    index_digest: str,
    signatures: Sequence[tuple[bytes, bytes]],
    annotations: Callable[[], Mapping[str, str]],
    expected_version: str | None = None,
    rollback: RollbackState | None = None,
    claimed_key_ids: Mapping[bytes, str] | None = None,
    where: str,
) -> Verdict:
    """THE decision whether the index `index_digest`, read under `tag`, is accepted.

    `policy` None means verification was switched off (insecure; the caller logged it):
    the index's own annotations then say what it is. Otherwise `verify_index` decides
    (threshold, signed digest, signed version, rollback against `rollback`). Either way
    the release's version must be a valid one and, for a `vX` tag (or an explicit
    `expected_version`), be X. `annotations` parses the index: it is called only after
    the signatures verified, so untrusted index bytes are read once a key vouched.
    `claimed_key_ids` (signature -> the key id its layer names) only words an error.
    """
    expected = expected_version if expected_version is not None else version_of_tag(tag)
    key_ids: tuple[str, ...] = ()
    if policy is None:
        annotated = annotations()
        version, created = annotated.get(ANN_VERSION), annotated.get(ANN_CREATED)
    else:
        verified = verify_index(
            policy,
            index_digest,
            signatures,
            expected_version=expected,
            newest_accepted_created=rollback.created if rollback else None,
            claimed_key_ids=claimed_key_ids,
            where=where,
        )
        version = verified.version or annotations().get(ANN_VERSION)
        created, key_ids = verified.created, verified.key_ids
    return Verdict(tag, index_digest, bind_version(version, expected, where), created, key_ids)


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
