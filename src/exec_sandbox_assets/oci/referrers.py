"""OCI 1.1 referrers: manifests that name another one as their `subject` (a Sigstore
bundle naming the release index, a delta naming a platform manifest).

Registries with the referrers API (`GET /v2/NAME/referrers/DIGEST`) list them by
themselves; ghcr.io and distribution 2.8 have none, so every writer here also keeps
the distribution spec's referrers tag schema: the tag `sha256-<hex>` of the subject
holds an image index listing the referrers' descriptors (with their `artifactType`
and annotations). Layouts and archives have no API at all and use the same tag, so a
mirror copies referrers as one more tag. Read, merge, write: two writers adding a
referrer to the same subject at the same moment can lose one (the spec's own race).

Pure: bytes in, bytes or parsed descriptors out; the I/O is each target's
`put_referrer` and each source's `referrers`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from exec_sandbox_assets.base import safejson
from exec_sandbox_assets.base.errors import ConfigError, FormatError, SizeLimitError
from exec_sandbox_assets.oci.model import (
    EMPTY_DESCRIPTOR,
    MAX_MANIFEST_SIZE,
    MEDIA_TYPE_INDEX,
    MEDIA_TYPE_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    canonical_json,
    check_digest,
    sha256_digest,
)

#: Sigstore bundle v0.3 (JSON): the referrer's artifactType and its one layer's type.
BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
#: A bundle is ~5-15 KB (a certificate, a DSSE envelope, a log entry with its proof);
#: anything near this is not one. The one cap every reader of a bundle applies.
MAX_BUNDLE_SIZE = 128 * 1024
#: Referrers of one subject a reader follows: each costs a manifest and a blob fetch,
#: and the list is unsigned (whoever serves it could otherwise send thousands).
MAX_REFERRERS = 64

# The annotations cosign 3 puts on a bundle referrer (and so on its descriptor).
ANN_BUNDLE_CONTENT = "dev.sigstore.bundle.content"
ANN_BUNDLE_PREDICATE_TYPE = "dev.sigstore.bundle.predicateType"
ANN_CREATED = "org.opencontainers.image.created"


def fallback_tag(subject_digest: str) -> str:
    """The referrers tag schema's tag for `subject_digest`: `<alg>-<hex>`, the
    algorithm cut to 32 characters and the hex to 64 (distribution-spec)."""
    check_digest(subject_digest, "referrers subject")
    algo, _, hexpart = subject_digest.partition(":")
    return f"{algo[:32]}-{hexpart[:64]}"


def referrer_manifest(
    subject: Descriptor,
    artifact_type: str,
    layers: Sequence[Descriptor],
    annotations: Mapping[str, str] | None = None,
) -> bytes:
    """An artifact manifest naming `subject`: config = the OCI empty descriptor (so the
    `{}` blob must be pushed with the layers), the layers as given."""
    subject_only = Descriptor(subject.media_type, subject.digest, subject.size)
    return Manifest(
        config=EMPTY_DESCRIPTOR,
        layers=tuple(layers),
        artifact_type=artifact_type,
        annotations=dict(annotations or {}),
        subject=subject_only,
    ).to_bytes()


def referrer_descriptor(data: bytes, subject_digest: str, where: str) -> dict[str, Any]:
    """The index entry for referrer manifest `data`, checked to name `subject_digest`.

    Its artifactType is the manifest's (else its config's media type, as the spec
    says), with the manifest's annotations."""
    manifest = Manifest.from_bytes(data, where)
    if manifest.subject is None or manifest.subject.digest != subject_digest:
        named = manifest.subject.digest if manifest.subject else "no subject"
        raise ConfigError(f"{where}: referrer names {named}, not {subject_digest}")
    desc = Descriptor(
        manifest.media_type,
        sha256_digest(data),
        len(data),
        dict(manifest.annotations),
        manifest.artifact_type or manifest.config.media_type,
    )
    return desc.to_json()


def merge_referrer(
    existing_index: bytes | None, manifest_desc: dict[str, Any], where: str = "referrers index"
) -> bytes:
    """The referrers index with `manifest_desc` added (once per digest); `where` names
    the existing index in errors (`target:sha256-<hex>`).

    An index already listing the digest comes back unchanged (re-publishing does not
    move the tag); entries and fields written by other tools are kept as they were."""
    desc = Descriptor.from_json(manifest_desc, "referrer descriptor")
    top: dict[str, Any] = {"schemaVersion": 2, "mediaType": MEDIA_TYPE_INDEX}
    entries: list[Any] = []
    if existing_index is not None:
        index = Index.from_bytes(existing_index, where)  # validates every entry
        if any(m.digest == desc.digest for m in index.manifests):
            return existing_index
        obj = safejson.loads_object(existing_index, where, max_size=MAX_MANIFEST_SIZE)
        entries = list(obj.pop("manifests"))
        top.update(obj)
        top["mediaType"] = MEDIA_TYPE_INDEX
    data = canonical_json({**top, "manifests": [*entries, desc.to_json()]})
    if len(data) > MAX_MANIFEST_SIZE:
        raise SizeLimitError(f"{where} would exceed {MAX_MANIFEST_SIZE} bytes")
    return data


def parse_referrers(
    data: bytes, subject_digest: str, artifact_type: str | None, where: str
) -> list[Descriptor]:
    """The manifests listed by a referrers index (API answer or fallback tag), of
    `artifact_type` (every one for None), at most MAX_REFERRERS. `where` names the
    list (`<source>: referrers of sha256:...`)."""
    if len(data) > MAX_MANIFEST_SIZE:
        raise SizeLimitError(f"{where}: {len(data)} bytes, more than {MAX_MANIFEST_SIZE}")
    index = Index.from_bytes(data, where)
    # An entry without artifactType is kept: copies that rewrite the index (skopeo 1.9
    # without --preserve-digests) drop it; the manifest itself still says its type.
    found = [
        m
        for m in index.manifests
        if m.media_type == MEDIA_TYPE_MANIFEST
        and (artifact_type is None or m.artifact_type in (artifact_type, None))
    ]
    if len(found) > MAX_REFERRERS:
        raise SizeLimitError(
            f"{where}: {len(found)} listed, more than the {MAX_REFERRERS} a client reads; refusing"
        )
    return found


def referrer_layers(
    data: bytes, subject_digest: str, media_type: str, where: str
) -> list[Descriptor]:
    """The layers of type `media_type` of a (digest-checked) referrer manifest whose
    artifact type is `media_type` too ([] for a referrer of another type); a
    FormatError when it is no manifest or names another subject (a list mixed up)."""
    manifest = Manifest.from_bytes(data, where)
    if manifest.subject is None or manifest.subject.digest != subject_digest:
        named = manifest.subject.digest if manifest.subject else "no subject"
        raise FormatError(f"referrer names {named}, not {subject_digest}", where)
    if (manifest.artifact_type or manifest.config.media_type) != media_type:
        return []
    return [layer for layer in manifest.layers if layer.media_type == media_type]


__all__ = [
    "BUNDLE_MEDIA_TYPE",
    "MAX_BUNDLE_SIZE",
    "MAX_REFERRERS",
    "fallback_tag",
    "merge_referrer",
    "parse_referrers",
    "referrer_descriptor",
    "referrer_layers",
    "referrer_manifest",
]
