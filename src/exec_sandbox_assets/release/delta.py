"""Delta upgrades in the wire format (docs/format.md §9): patches named by a signed layer
annotation, kept alive by a referrer of the platform manifest.

A layer of release N+1 may carry `dev.exec-sandbox.delta.patches`: one entry per earlier
content of the same file the publisher made a patch from. Each entry names the content
digest and size the patch applies to, and the patch blob's digest and size, so a client
holding that content (verified by its digest) downloads the patch instead of the layer,
checks the patch digest before decoding, and the result against `content.digest`.

The patch blobs are listed, as layers, by one manifest per platform manifest whose
`subject` is that platform manifest (an OCI 1.1 referrer): registries keep blobs only
while a manifest names them. Its bytes are a function of the platform manifest alone
(`keepalive_manifest`), so the publisher and `mirror` write the very same document,
each with `Target.put_referrer` (by digest, and listed under the subject's
`sha256-<hex>` tag: registries without the referrers API keep it too).

Pure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from exec_sandbox_assets.base.errors import FormatError
from exec_sandbox_assets.oci.model import (
    MEDIA_TYPE_MANIFEST,
    Descriptor,
    Manifest,
    check_digest,
)
from exec_sandbox_assets.oci.referrers import referrer_manifest
from exec_sandbox_assets.release import catalog

ANN_PATCHES = "dev.exec-sandbox.delta.patches"
ANN_PATCH_FROM = "dev.exec-sandbox.delta.from"
PATCH_MEDIA_TYPE = "application/vnd.exec-sandbox.patch.v1+zstd"
KEEPALIVE_ARTIFACT_TYPE = "application/vnd.exec-sandbox.delta.v1"
# A few earlier releases at most: each entry costs ~150 bytes of every manifest read.
MAX_PATCHES = 8
_MAX_SIZE_DIGITS = 19


@dataclass(frozen=True)
class Patch:
    """A patch turning the content `base_digest` (`base_size` bytes) into a layer's content."""

    base_digest: str
    base_size: int
    digest: str
    size: int

    def descriptor(self) -> Descriptor:
        return Descriptor(
            PATCH_MEDIA_TYPE, self.digest, self.size, {ANN_PATCH_FROM: self.base_digest}
        )


def format_patches(patches: Sequence[Patch]) -> str:
    """The annotation value: entries joined by `,`, fields by one space."""
    return ",".join(f"{p.base_digest} {p.base_size} {p.digest} {p.size}" for p in patches)


def _size(text: str, what: str, where: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= _MAX_SIZE_DIGITS):
        raise FormatError(f"{ANN_PATCHES}: invalid {what} {text[:24]!r}", where)
    return int(text)


def read_patches(ann: Mapping[str, str], where: str) -> tuple[Patch, ...]:
    """The patches a layer's (signed) annotations name; () when it names none.

    A malformed value is refused like any malformed signed annotation: it is a broken
    release, never a reason to skip a check.
    """
    value = ann.get(ANN_PATCHES)
    if value is None:
        return ()
    entries = value.split(",")
    if len(entries) > MAX_PATCHES:
        raise FormatError(f"{ANN_PATCHES}: {len(entries)} entries, at most {MAX_PATCHES}", where)
    out: list[Patch] = []
    for entry in entries:
        fields = entry.split(" ")
        if len(fields) != 4:
            raise FormatError(
                f"{ANN_PATCHES}: entry {entry[:80]!r} is not 'FROM-DIGEST FROM-SIZE "
                "PATCH-DIGEST PATCH-SIZE'",
                where,
            )
        base, base_size, digest, size = fields
        out.append(
            Patch(
                check_digest(base, f"{where} {ANN_PATCHES}"),
                _size(base_size, "base size", where),
                check_digest(digest, f"{where} {ANN_PATCHES}"),
                _size(size, "patch size", where),
            )
        )
    if len({p.base_digest for p in out}) != len(out):
        raise FormatError(f"{ANN_PATCHES}: two patches from the same content", where)
    return tuple(out)


def manifest_patches(manifest: Manifest, where: str) -> tuple[Patch, ...]:
    """Every distinct patch the layers of a platform manifest name, in layer order."""
    seen: dict[str, Patch] = {}
    for layer in manifest.layers:
        for patch in read_patches(layer.annotations, f"{where} layer {layer.digest}"):
            seen.setdefault(patch.digest, patch)
    return tuple(seen.values())


def keepalive_manifest(platform_manifest: bytes, where: str) -> bytes | None:
    """The referrer that keeps a platform manifest's patch blobs alive, or None when its
    layers name no patch. Deterministic: publisher and mirror write the same bytes."""
    manifest = Manifest.from_bytes(platform_manifest, where)
    patches = manifest_patches(manifest, where)
    if not patches:
        return None
    subject = Descriptor.for_bytes(MEDIA_TYPE_MANIFEST, platform_manifest)
    annotations = {}
    if (version := manifest.annotations.get(catalog.ANN_VERSION)) is not None:
        annotations[catalog.ANN_VERSION] = version
    layers = [p.descriptor() for p in patches]
    return referrer_manifest(subject, KEEPALIVE_ARTIFACT_TYPE, layers, annotations)


__all__ = [
    "ANN_PATCHES",
    "KEEPALIVE_ARTIFACT_TYPE",
    "MAX_PATCHES",
    "PATCH_MEDIA_TYPE",
    "Patch",
    "format_patches",
    "keepalive_manifest",
    "manifest_patches",
    "read_patches",
]
