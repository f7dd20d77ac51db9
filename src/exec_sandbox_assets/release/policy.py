"""The trust policy: whether a release index is accepted (docs/format.md, "Acceptance").

Pure, as python-tuf's trusted metadata set: it takes bytes already fetched (the index
digest, the signature payloads) and state already read (the newest accepted creation
time), and returns a verdict or raises a `TrustError`. No network, no files, no
environment: the `ReleaseReader` (sources/reader.py) does the fetching and the caller
keeps the state.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from exec_sandbox_assets.errors import (
    ConfigError,
    FormatError,
    NoTrustedKeysError,
    RollbackError,
    SignatureError,
    VersionMismatchError,
)
from exec_sandbox_assets.release.keys import PublicKey
from exec_sandbox_assets.release.signing import SignedPayload, parse_payload, parse_timestamp

logger = logging.getLogger(__name__)

_HOW_TO_CONFIGURE = (
    "configure a trusted public key (PEM 'PUBLIC KEY', as `cosign verify --key` takes): "
    "set EXEC_SANDBOX_TRUSTED_KEYS=/path/key.pub or pass trusted_keys=[...]; "
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


def require_keys(policy: TrustPolicy, where: str) -> None:
    """Fail closed, before any remote byte is read, when no trusted key is configured."""
    if not policy.keys:
        raise NoTrustedKeysError(f"{where}: no trusted key is configured; {_HOW_TO_CONFIGURE}")


def verify_index(
    policy: TrustPolicy,
    index_digest: str,
    signatures: Sequence[tuple[bytes, bytes]],
    *,
    expected_version: str | None,
    newest_accepted_created: str | None,
    where: str,
) -> VerifiedRelease:
    """Accept the index `index_digest` (computed by the caller over the bytes it fetched)
    or raise. `signatures` are (payload bytes, raw signature) pairs."""
    require_keys(policy, f"{where}: refusing unverified remote content (index {index_digest})")
    keys = list({k.key_id: k for k in policy.keys}.values())

    # Verify before parsing: untrusted bytes are only interpreted once a trusted key
    # has vouched for them.
    accepted: dict[str, list[SignedPayload]] = {}
    other_digest = 0
    for n, (payload, signature) in enumerate(signatures):
        signers = [k for k in keys if k.verify(signature, payload)]
        if not signers:
            continue
        try:
            parsed = parse_payload(payload, f"{where} signature {n}")
        except FormatError as exc:
            logger.debug("signed payload unparsable", extra={"where": where, "error": str(exc)})
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
