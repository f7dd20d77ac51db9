"""Report mode (`inspect`, `versions`): what a reference holds and whether a set of keys
and workflows would accept it, read through the one `ReleaseReader` but collecting
findings instead of raising trust errors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from exec_sandbox_assets.base.errors import AssetError, ConfigError, FormatError, TrustError
from exec_sandbox_assets.oci.model import (
    INDEX_MEDIA_TYPES,
    Descriptor,
    Index,
    Manifest,
    media_type_of,
    sha256_digest,
)
from exec_sandbox_assets.release.keyless import Workflow
from exec_sandbox_assets.release.policy import (
    SignatureFinding,
    TrustPolicy,
    Verdict,
    accept_index,
    describe_signature,
)
from exec_sandbox_assets.sources.reader import ReleaseReader, SignatureRecord

if TYPE_CHECKING:
    from exec_sandbox_assets.release.keys import PublicKey


@dataclass
class Findings:
    """What `examine` found: everything it could read, and the verdict or why not."""

    reference: str
    digest: str
    media_type: str = ""
    size: int = 0
    annotations: dict[str, str] = field(default_factory=dict)
    manifests: list[tuple[Descriptor, Manifest]] = field(default_factory=list)
    signature_present: bool = False
    signatures: list[SignatureFinding] = field(default_factory=list)
    verdict: Verdict | None = None
    error: str | None = None
    bundles: int = 0  # Sigstore bundles found (keyless signatures), checked by the verdict


async def examine(
    reader: ReleaseReader,
    reference: str,
    keys: Sequence[PublicKey],
    threshold: int,
    workflows: Sequence[Workflow] = (),
    sigstore_root: Path | None = None,
) -> Findings:
    """Report mode (`inspect`): read what `reference` holds and whether `keys` and
    `workflows` (at `threshold`) would accept it, collecting findings instead of
    raising trust errors. A single manifest is shown as a one-platform release."""
    source = reader.source
    data = await source.index(reference)
    digest = sha256_digest(data)
    media_type = media_type_of(data, source.name)
    where = f"{source.name} {reference}"
    annotations: dict[str, str]
    if media_type in INDEX_MEDIA_TYPES:
        index = Index.from_bytes(data, where)
        annotations = dict(index.annotations)
    else:
        annotations = dict(Manifest.from_bytes(data, where).annotations)
        index = Index((Descriptor(media_type, digest, len(data)),))
    found = Findings(reference, digest, media_type, len(data), annotations)
    for desc in index.manifests:
        mdata = await source.manifest(desc)
        found.manifests.append(
            (desc, Manifest.from_bytes(mdata, f"{source.name} manifest {desc.digest}"))
        )
    await examine_signature(reader, found, keys, threshold, workflows, sigstore_root)
    return found


async def examine_signature(
    reader: ReleaseReader,
    found: Findings,
    keys: Sequence[PublicKey],
    threshold: int,
    workflows: Sequence[Workflow] = (),
    sigstore_root: Path | None = None,
) -> None:
    """Report mode for the signatures of `found.digest` alone: fills the signature
    findings and the verdict (or the reason there is none) of `found`."""
    source = reader.source
    signature: SignatureRecord | None = None
    try:
        signature = await reader.signature(found.digest, source.name)
    except TrustError as exc:  # no signature manifest, or one no client reads
        found.error = str(exc)
    bundles: list[bytes] = []
    if workflows:
        try:
            bundles = await reader.keyless_bundles(found.digest)
        except AssetError as exc:  # unreadable referrers: reported, not fatal
            found.error = f"{found.error}; {exc}" if found.error else str(exc)
    found.bundles = len(bundles)
    if signature is None and not bundles:
        return
    found.error = None
    found.signature_present = signature is not None
    if signature is not None:
        found.signatures = [
            describe_signature(
                keys,
                layer.payload_digest,
                signature.payloads[layer.payload_digest],
                layer.signature,
                f"{source.name} signature {n}",
            )
            for n, layer in enumerate(signature.layers)
        ]
    try:
        found.verdict = accept_index(
            TrustPolicy(
                keys=tuple(keys),
                threshold=threshold,
                workflows=tuple(workflows),
                sigstore_root=sigstore_root,
            ),
            tag=found.reference,
            index_digest=found.digest,
            signatures=signature.pairs() if signature is not None else (),
            claimed_key_ids=signature.key_ids() if signature is not None else None,
            bundles=bundles,
            annotations=lambda: found.annotations,
            where=source.name,
        )
    except (TrustError, ConfigError, FormatError) as exc:
        found.error = str(exc)


__all__ = ["Findings", "examine", "examine_signature"]
