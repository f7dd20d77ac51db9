"""`inspect REF`: what a release reference holds, and whether its signature verifies.

Reads through the same `Source` classes the client uses (sizes capped, digests checked),
but reports instead of failing: an unsigned or untrusted release is shown as such, and
only `--require-signature` turns that into exit code 3.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from exec_sandbox_assets import sources
from exec_sandbox_assets.base.errors import ConfigError, FormatError, SignatureError
from exec_sandbox_assets.base.safetext import clean_text
from exec_sandbox_assets.cli.login import given_credentials
from exec_sandbox_assets.cli.output import (
    EXIT_OK,
    EXIT_TRUST,
    Failure,
    emit_json,
    err,
    human_size,
    json_result,
    out,
    short_digest,
    table,
)
from exec_sandbox_assets.cli.table import Context
from exec_sandbox_assets.config import Settings
from exec_sandbox_assets.oci.auth import Credentials
from exec_sandbox_assets.oci.model import (
    Descriptor,
    signature_tag,
)
from exec_sandbox_assets.oci.reference import LayoutRef, RegistryRef, parse_source_ref
from exec_sandbox_assets.release import catalog
from exec_sandbox_assets.release.documents import read_asset_layer
from exec_sandbox_assets.release.keys import PublicKey, load_public_key_file
from exec_sandbox_assets.sources import Source
from exec_sandbox_assets.sources.reader import ReleaseReader
from exec_sandbox_assets.sources.report import Findings, examine, examine_signature


@dataclass
class InspectReport:
    ref: str
    source: str
    reference: str
    digest: str = ""
    media_type: str = ""
    size: int = 0
    annotations: dict[str, str] = field(default_factory=dict)
    platforms: list[dict[str, Any]] = field(default_factory=list)
    signature: dict[str, Any] = field(default_factory=dict)

    @property
    def verified(self) -> bool:
        return bool(self.signature.get("verified"))

    def to_json(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "source": self.source,
            "reference": self.reference,
            "digest": self.digest,
            "media_type": self.media_type,
            "size": self.size,
            "version": self.annotations.get(catalog.ANN_VERSION),
            "created": self.annotations.get(catalog.ANN_CREATED),
            "annotations": self.annotations,
            "platforms": self.platforms,
            "signature": self.signature,
        }


def parse_ref(text: str, settings: Settings) -> RegistryRef | LayoutRef:
    """A source reference, refused offline unless it is on this machine."""
    ref = parse_source_ref(text)
    if settings.offline and not isinstance(ref, LayoutRef):
        raise ConfigError(
            f"{text}: offline mode allows only local references (oci:DIR, oci-archive:FILE)"
        )
    return ref


def open_ref(
    text: str, settings: Settings, credentials: Credentials | None = None
) -> tuple[Source, str | None]:
    """The source a reference names, and the tag or digest it pins (if any)."""
    ref = parse_ref(text, settings)
    source = sources.open_source(
        text,
        ref,
        docker_config=settings.docker_config,
        ca_bundle=settings.ca_bundle,
        credentials=credentials,
        policy=settings.transfer_policy(),
    )
    return source, ref.tag if isinstance(ref, LayoutRef) else ref.reference


def _layer_json(desc: Descriptor, where: str) -> dict[str, Any]:
    try:
        layer = read_asset_layer(desc, where)
    except FormatError as exc:
        return {
            "title": desc.title,
            "media_type": desc.media_type,
            "digest": desc.digest,
            "size": desc.size,
            "error": str(exc),
        }
    return {
        "title": layer.title,
        "kind": layer.kind.value,
        "arch": layer.arch,
        "language": layer.language.value if layer.language else None,
        "media_type": layer.media_type,
        "digest": layer.digest,
        "size": layer.size,
        "content_digest": layer.content_digest,
        "content_size": layer.content_size,
    }


def _signature_json(
    found: Findings, keys: Sequence[PublicKey], settings: Settings
) -> dict[str, Any]:
    entries: list[dict[str, Any]] = []
    for finding in found.signatures:
        entry: dict[str, Any] = {
            "payload_digest": finding.payload_digest,
            "signed_by": list(finding.signed_by),
        }
        if finding.payload is None:
            entry["error"] = finding.error
        else:
            parsed = finding.payload
            entry.update(
                signed_digest=parsed.digest,
                matches_index=parsed.digest == found.digest,
                version=parsed.version,
                created=parsed.created,
                docker_reference=parsed.docker_reference,
            )
        entries.append(entry)
    return {
        "tag": signature_tag(found.digest),
        "present": found.signature_present,
        "entries": entries,
        "trusted_keys": [k.describe() for k in keys],
        "trusted_workflows": list(settings.trusted_workflows),
        "bundles": found.bundles,
        "threshold": settings.threshold,
        "verified": found.verdict is not None,
        "verified_by": list(found.verdict.key_ids) if found.verdict else [],
        "verified_by_identity": (
            [s.identity for s in found.verdict.identities] if found.verdict else []
        ),
        "error": found.error,
    }


async def _signature(
    source: Source, digest: str, keys: tuple[PublicKey, ...], settings: Settings, tag: str
) -> dict[str, Any]:
    """The signature part of a report, for index `digest` read under `tag` (`versions`)."""
    found = Findings(tag, digest)
    await examine_signature(
        ReleaseReader(source, None),
        found,
        keys,
        settings.threshold,
        settings.workflows,
        settings.sigstore_root,
    )
    return _signature_json(found, keys, settings)


async def inspect_ref(
    text: str, settings: Settings, credentials: Credentials | None = None
) -> InspectReport:
    keys = tuple(load_public_key_file(p) for p in settings.trusted_keys)
    source, pinned = open_ref(text, settings, credentials)
    reference = pinned or settings.tag
    try:
        # Report mode: the client's reader and policy, findings instead of errors.
        found = await examine(
            ReleaseReader(source, None),
            reference,
            keys,
            settings.threshold,
            settings.workflows,
            settings.sigstore_root,
        )
    finally:
        await source.aclose()
    report = InspectReport(text, source.name, reference, found.digest, found.media_type, found.size)
    report.annotations = found.annotations
    report.platforms = [
        {
            "platform": str(desc.platform) if desc.platform else None,
            "digest": desc.digest,
            "size": desc.size,
            "files": [
                _layer_json(layer, f"{source.name} manifest {desc.digest}")
                for layer in manifest.layers
            ],
        }
        for desc, manifest in found.manifests
    ]
    report.signature = _signature_json(found, keys, settings)
    return report


def print_report(report: InspectReport) -> None:
    """The report as text. What the source wrote (annotations, titles, signed claims)
    goes through `clean_text`: one line each, however it was written (--json keeps it
    exact, JSON escapes it)."""
    out(f"{report.ref}")
    out(f"  digest     {report.digest} ({report.media_type}, {report.size} bytes)")
    ann = report.annotations
    for label, key in (
        ("version", catalog.ANN_VERSION),
        ("created", catalog.ANN_CREATED),
        ("source", catalog.ANN_SOURCE),
        ("revision", catalog.ANN_REVISION),
    ):
        if key in ann:
            out(f"  {label:<10} {clean_text(ann[key])}")
    for p in report.platforms:
        files = p["files"]
        size = sum(int(f["size"]) for f in files)
        content = sum(int(f.get("content_size") or f["size"]) for f in files)
        out(
            f"platform {p['platform'] or '-'}: {short_digest(p['digest'])}, {len(files)} file(s), "
            f"{human_size(size)} ({human_size(content)} unpacked)"
        )
        rows = [
            (
                clean_text(str(f.get("title") or "-")),
                clean_text(str(f.get("kind") or "?")),
                human_size(int(f["size"])),
                human_size(int(f["content_size"])) if "content_size" in f else "-",
                short_digest(f["digest"]),
            )
            for f in files
        ]
        for line in table(rows, indent="    "):
            out(line)
    sig = report.signature
    if not sig.get("present"):
        why = f" ({sig['error']})" if sig.get("error") and not sig.get("bundles") else ""
        out(f"signature {sig.get('tag')}: none{why}")
    else:
        out(f"signature {sig['tag']}: {len(sig['entries'])} signature(s)")
        for n, e in enumerate(sig["entries"]):
            by = ", ".join(k[:16] for k in e["signed_by"]) or "no trusted key"
            match = "matches the index" if e.get("matches_index") else "OTHER digest"
            claims = clean_text(f"version {e.get('version')}, created {e.get('created')}")
            out(f"  #{n}: {match}, {claims}; valid for: {by}")
    if sig.get("trusted_workflows"):
        out(f"keyless: {sig.get('bundles', 0)} Sigstore bundle(s)")
    if not sig.get("trusted_keys") and not sig.get("trusted_workflows"):
        out(
            "trusted keys: none configured (--trusted-key or EXEC_SANDBOX_TRUSTED_KEYS; "
            "--trusted-workflow or EXEC_SANDBOX_TRUSTED_WORKFLOWS)"
        )
    if report.verified:
        identities = sig.get("verified_by_identity") or []
        by = "".join(f" and {i}" for i in identities)
        out(f"verdict: VERIFIED by {len(sig['verified_by'])} trusted key(s){by}")
    else:
        out(f"verdict: NOT VERIFIED: {sig.get('error')}")


def run_inspect(ctx: Context) -> int:
    args = ctx.args
    report = asyncio.run(inspect_ref(args.ref, ctx.settings, given_credentials(args)))
    refused = (
        [SignatureError(f"{report.ref}: signature not verified: {report.signature.get('error')}")]
        if args.require_signature and not report.verified
        else []
    )
    if args.json:
        emit_json(json_result(report.to_json(), [Failure(e) for e in refused]))
    elif not ctx.ui.quiet:
        print_report(report)
    for exc in refused:
        err(f"error: {exc}")
        return EXIT_TRUST
    return EXIT_OK


__all__ = ["InspectReport", "inspect_ref", "open_ref", "print_report", "run_inspect"]
