"""The publisher's signatures: what to write (existing ones kept, as cosign appends),
checked before it is written, and read back through the client's `ReleaseReader`.

Signatures accumulate: publishing the same release again with another key keeps the
signatures the targets hold for it (those whose payload names this very index,
version and created) and adds one by the new key, one layer per signature in one
signature manifest. `replace` (`--replace-signatures`) keeps only the given keys'.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from exec_sandbox_assets.base.errors import (
    AssetNotFoundError,
    ConfigError,
    FormatError,
    SignatureError,
    TrustError,
)
from exec_sandbox_assets.oci.model import sha256_digest, signature_tag
from exec_sandbox_assets.oci.target import Target
from exec_sandbox_assets.release import keys, policy, signing
from exec_sandbox_assets.release.catalog import ANN_CREATED, ANN_VERSION
from exec_sandbox_assets.release.documents import BuiltRelease
from exec_sandbox_assets.release.keyless import Workflow
from exec_sandbox_assets.release.version import same_version
from exec_sandbox_assets.sources.reader import ReleaseReader
from exec_sandbox_assets.sources.target import TargetSource

log = logging.getLogger(__name__)
_T = TypeVar("_T")


def run_async(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a reader coroutine from this synchronous code (on a thread when the caller
    already runs an event loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _for_this_release(payload: bytes, index_digest: str, version: str, created: str) -> bool:
    """Whether a payload describes exactly this release (others are dropped, not kept)."""
    try:
        parsed = signing.parse_payload(payload, "existing signature")
    except FormatError:
        return False
    return (
        parsed.digest == index_digest
        and parsed.version is not None
        and same_version(parsed.version, version)
        and parsed.created == created
    )


@dataclass(frozen=True)
class KeptSignatures:
    """The signatures the targets hold for this release: (payload, signature) pairs in
    order, once each, and the key id each one's layer names (kept as written)."""

    pairs: list[tuple[bytes, bytes]]
    key_ids: dict[bytes, str]


def existing_signatures(
    targets: Sequence[Target], index_digest: str, version: str, created: str
) -> KeptSignatures:
    """What the targets hold for this release (`KeptSignatures`)."""
    found: dict[tuple[str, bytes], tuple[bytes, bytes]] = {}
    key_ids: dict[bytes, str] = {}
    for target in targets:
        reader = ReleaseReader(TargetSource(target), None)
        try:
            record = run_async(reader.signature(index_digest))
        except (TrustError, FormatError, AssetNotFoundError) as exc:
            # Missing or unreadable: nothing to keep (transport errors still stop us).
            log.debug("no signature kept from %s: %s", target.name, exc)
            continue
        named = record.key_ids()
        for payload, signature in record.pairs():
            if _for_this_release(payload, index_digest, version, created):
                found.setdefault((sha256_digest(payload), signature), (payload, signature))
                if signature in named:
                    key_ids.setdefault(signature, named[signature])
    return KeptSignatures(list(found.values()), key_ids)


def added_count(
    existing: Sequence[tuple[bytes, bytes]], manifest: signing.SignatureManifest
) -> int:
    """How many of `manifest`'s signatures are not among `existing` (the ones this run
    made), for "2 signatures (1 added)"."""
    before = {(sha256_digest(payload), signature) for payload, signature in existing}
    layers = signing.read_signature_manifest(manifest.manifest, "the new signature")
    return sum((layer.payload_digest, layer.signature) not in before for layer in layers)


def plan_signature(
    existing: Sequence[tuple[bytes, bytes]],
    keys: Sequence[keys.SigningKey],
    index_digest: str,
    docker_reference: str,
    version: str,
    created: str,
    *,
    replace: bool = False,
    key_ids: Mapping[bytes, str] | None = None,
) -> signing.SignatureManifest:
    """The signature manifest to write: the existing signatures (only our keys' with
    `replace`), plus one by each key that has none yet, each new layer naming its key
    (existing layers keep what they named: `key_ids`, so a re-run changes no digest).
    Checked before it is written."""
    unique = list({k.public.key_id: k for k in keys}.values())
    if not unique:
        raise ConfigError("no signing key given")

    def ours(pair: tuple[bytes, bytes]) -> bool:
        return any(k.public.verify(pair[1], pair[0]) for k in unique)

    entries = [pair for pair in existing if ours(pair)] if replace else list(existing)
    named = dict(key_ids or {})
    payload: bytes | None = None
    for key in unique:
        if any(key.public.verify(sig, data) for data, sig in entries):
            continue  # kept as it is: re-signing would change the manifest's digest
        payload = payload or signing.make_payload(index_digest, docker_reference, version, created)
        signature = key.sign(payload)
        entries.append((payload, signature))
        named[signature] = key.public.key_id
    if len(entries) > signing.MAX_SIGNATURE_LAYERS:
        raise ConfigError(
            f"index {index_digest} would carry {len(entries)} signatures, more than the "
            f"{signing.MAX_SIGNATURE_LAYERS} a client checks; pass --replace-signatures"
        )
    _check_signed(entries, unique, index_digest, version, created, "the new signature")
    return signing.build_signature_manifest(entries, named)


def _every_key(keys: Sequence[keys.SigningKey]) -> policy.TrustPolicy:
    """The read-back policy: every one of our keys must have signed."""
    publics = tuple({k.public.key_id: k.public for k in keys}.values())
    return policy.TrustPolicy(keys=publics, threshold=len(publics))


def _check_signed(
    signatures: Sequence[tuple[bytes, bytes]],
    keys: Sequence[keys.SigningKey],
    index_digest: str,
    version: str,
    created: str,
    where: str,
) -> None:
    """Refuse signatures that do not verify, each key, with the client's own policy."""
    verdict = policy.accept_index(
        _every_key(keys),
        tag=index_digest,
        index_digest=index_digest,
        signatures=signatures,
        annotations=lambda: {ANN_VERSION: version, ANN_CREATED: created},
        expected_version=version,
        where=where,
    )
    _check_created(verdict.created, created, where)


def _check_created(signed: str | None, created: str, where: str) -> None:
    if signed != created:
        raise SignatureError(f"{where}: signed created {signed!r}, expected {created!r}")


def read_back(
    target: Target,
    built: BuiltRelease,
    keys: Sequence[keys.SigningKey],
    version: str,
    created: str,
    workflows: Sequence[Workflow] = (),
    roots: Sequence[Path | None] = (None,),
) -> None:
    """Read the release back from `target` as a client would (the one `ReleaseReader`),
    and check that it is the index we built, signed by every one of our keys and, with
    `workflows`, keyless by one of them: once with each trusted root in `roots`."""
    index_digest = sha256_digest(built.index)
    publics = tuple({k.public.key_id: k.public for k in keys}.values())
    where = f"{target.name}:{signature_tag(index_digest) if publics else index_digest}"
    for root in roots if workflows else (None,):
        threshold = len(publics) + (1 if workflows else 0)
        trust = policy.TrustPolicy(
            publics, threshold, workflows=tuple(workflows), sigstore_root=root
        )
        reader = ReleaseReader(TargetSource(target), trust)
        # `read` checks the bytes against `index_digest`: what reads back is what we built.
        verified = run_async(reader.read(index_digest, expected_version=version))
        _check_created(verified.created, created, where)


__all__ = [
    "KeptSignatures",
    "added_count",
    "existing_signatures",
    "plan_signature",
    "read_back",
    "run_async",
]
