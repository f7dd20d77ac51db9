"""`versions SOURCE`: the releases a registry repository or an OCI layout holds, each
with its index digest, created date and whether its signature verifies.

Tags come from the registry's tag list (`oci.registry.RegistryClient.list_tags`) or the
layout's index.json; each release index is read through the same `Source` the client
uses (sizes capped, digests checked) and its signature checked as `inspect` does.
"""

from __future__ import annotations

import asyncio
from typing import Any

from exec_sandbox_assets.base.errors import AssetError, NoTrustedKeysError
from exec_sandbox_assets.base.safetext import clean_text
from exec_sandbox_assets.cli.inspect import _signature as signature_report
from exec_sandbox_assets.cli.inspect import open_ref, parse_ref
from exec_sandbox_assets.cli.login import given_credentials
from exec_sandbox_assets.cli.output import (
    EXIT_OK,
    emit_json,
    err,
    json_result,
    out,
    short_digest,
    table,
)
from exec_sandbox_assets.cli.table import Context
from exec_sandbox_assets.config import LATEST, Settings
from exec_sandbox_assets.oci.auth import Credentials
from exec_sandbox_assets.oci.model import INDEX_MEDIA_TYPES, Index, media_type_of, sha256_digest
from exec_sandbox_assets.oci.reference import LayoutRef
from exec_sandbox_assets.release import catalog
from exec_sandbox_assets.release.keys import PublicKey, load_public_key_file
from exec_sandbox_assets.release.policy import TrustPolicy, require_keys
from exec_sandbox_assets.sources import Source


def is_release_tag(tag: str) -> bool:
    """`latest` and `vVERSION`; not the `sha256-....sig` signature tags."""
    return tag == LATEST or (tag.startswith("v") and catalog.is_valid_title(tag[1:]))


async def list_tags(text: str, settings: Settings, credentials: Credentials | None) -> list[str]:
    ref = parse_ref(text, settings)
    if isinstance(ref, LayoutRef):
        from exec_sandbox_assets.oci.layout import LayoutReader

        reader = await asyncio.to_thread(LayoutReader.open, ref.path, ref.kind == "oci-archive")
        try:
            return sorted(reader.tags())
        finally:
            reader.close()
    from exec_sandbox_assets.config import auth_files
    from exec_sandbox_assets.oci.credentials import find_credentials
    from exec_sandbox_assets.oci.registry import RegistryClient

    if credentials is None:
        credentials = find_credentials(ref.host, auth_files(settings.docker_config))
    async with RegistryClient(
        ref,
        credentials=credentials,
        ca_bundle=settings.ca_bundle,
        policy=settings.transfer_policy(),
    ) as client:
        return await client.list_tags()


# A release's verdict when no key is trusted; the hint how to configure one is said once
# for all of them (`no_keys_hint`), not once per tag.
NO_TRUSTED_KEY = "no trusted key or release workflow is configured"


def no_keys_hint(text: str, keys: tuple[PublicKey, ...], settings: Settings) -> str | None:
    """How to configure a trusted key, when nobody is trusted (the policy's own message),
    else None."""
    trust = TrustPolicy(keys=keys, threshold=settings.threshold, workflows=settings.workflows)
    try:
        require_keys(trust, text)
    except NoTrustedKeysError as exc:
        return str(exc)
    return None


async def list_releases(
    text: str, settings: Settings, credentials: Credentials | None = None
) -> list[dict[str, Any]]:
    """One entry per release tag of `text`, newest first (`latest` on top)."""
    keys = tuple(load_public_key_file(p) for p in settings.trusted_keys)
    no_keys = no_keys_hint(text, keys, settings) is not None
    tags = [t for t in await list_tags(text, settings, credentials) if is_release_tag(t)]
    source, _ = open_ref(text, settings, credentials)
    releases: list[dict[str, Any]] = []
    try:
        for tag in tags:
            entry: dict[str, Any] = {"tag": tag}
            try:
                data = await source.index(tag)
                digest = sha256_digest(data)
                entry["digest"] = digest
                annotations: dict[str, str] = {}
                if media_type_of(data, source.name) in INDEX_MEDIA_TYPES:
                    annotations = dict(Index.from_bytes(data, f"{source.name} {tag}").annotations)
                entry["version"] = annotations.get(catalog.ANN_VERSION)
                entry["created"] = annotations.get(catalog.ANN_CREATED)
                entry["signature"] = (
                    # Nothing could verify it: not read at all.
                    {"verified": False, "signed_by": [], "error": NO_TRUSTED_KEY}
                    if no_keys
                    else await _signature_entry(source, digest, keys, settings, tag)
                )
            except AssetError as exc:
                entry["error"] = str(exc)
            releases.append(entry)
    finally:
        await source.aclose()
    latest = [r for r in releases if r["tag"] == LATEST]
    rest = sorted(
        (r for r in releases if r["tag"] != LATEST),
        key=lambda r: (str(r.get("created") or ""), r["tag"]),
        reverse=True,
    )
    return latest + rest


async def _signature_entry(
    source: Source, digest: str, keys: tuple[PublicKey, ...], settings: Settings, tag: str
) -> dict[str, Any]:
    sig = await signature_report(source, digest, keys, settings, tag)
    return {
        "verified": sig["verified"],
        "signed_by": sig["verified_by"],
        "signed_by_identity": sig["verified_by_identity"],
        "error": sig["error"],
    }


def _verdict(entry: dict[str, Any]) -> str:
    if "error" in entry:
        return f"unreadable: {entry['error']}"
    sig = entry["signature"]
    if sig["verified"]:
        signers = [k[:16] for k in sig["signed_by"]] + list(sig.get("signed_by_identity", []))
        return "verified (" + ", ".join(signers) + ")"
    return f"NOT verified: {sig['error']}"


def run_versions(ctx: Context) -> int:
    args, settings = ctx.args, ctx.settings
    text = args.source or (settings.mirrors[0] if settings.mirrors else settings.registry)
    releases = asyncio.run(list_releases(text, settings, given_credentials(args)))
    keys = tuple(load_public_key_file(p) for p in settings.trusted_keys)
    hint = no_keys_hint(text, keys, settings)
    if args.json:
        emit_json(json_result({"source": text, "releases": releases, "hint": hint}))
        return EXIT_OK
    if hint is not None:
        err(f"warning: {hint}")
    if ctx.ui.quiet:
        return EXIT_OK
    out(f"{text}: {len(releases)} release tag(s)")
    rows = [
        (
            r["tag"],
            clean_text(str(r.get("created") or "-")),  # the index's, as its source wrote it
            short_digest(r["digest"]) if "digest" in r else "-",
            _verdict(r),
        )
        for r in releases
    ]
    for line in table(rows):
        out(line)
    return EXIT_OK


__all__ = [
    "NO_TRUSTED_KEY",
    "is_release_tag",
    "list_releases",
    "list_tags",
    "no_keys_hint",
    "run_versions",
]
