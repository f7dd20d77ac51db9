"""A release as OCI documents (docs/format.md §3-§4): build them, and read them back.

Pure. The publisher calls `build_release`; the client calls `read_asset_layers` on a
platform manifest whose digest it has already verified. Both sides use the catalog,
so names, media types and annotations cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from exec_sandbox_assets.base.errors import FormatError
from exec_sandbox_assets.oci.model import (
    EMPTY_DESCRIPTOR,
    MEDIA_TYPE_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    Platform,
    check_digest,
)
from exec_sandbox_assets.release import catalog
from exec_sandbox_assets.release.catalog import AssetSpec, Kind, Language
from exec_sandbox_assets.release.chunks import ChunkDigests, read_chunks


@dataclass(frozen=True)
class ReleaseInfo:
    version: str
    created: str  # RFC 3339, UTC
    source: str = "https://github.com/dualeai/exec-sandbox"
    revision: str | None = None

    def annotations(self) -> dict[str, str]:
        out = {
            catalog.ANN_VERSION: self.version,
            catalog.ANN_CREATED: self.created,
            catalog.ANN_SOURCE: self.source,
        }
        if self.revision:
            out[catalog.ANN_REVISION] = self.revision
        return out


@dataclass(frozen=True)
class LayerFile:
    """A file as it will be pushed: its blob digest/size and its decompressed digest/size."""

    spec: AssetSpec
    digest: str
    size: int
    content_digest: str
    content_size: int
    chunks: ChunkDigests | None = None

    def descriptor(self) -> Descriptor:
        ann = {
            catalog.ANN_TITLE: self.spec.name,
            catalog.ANN_KIND: self.spec.kind.value,
            catalog.ANN_ARCH: self.spec.arch,
            catalog.ANN_CONTENT_DIGEST: self.content_digest,
            catalog.ANN_CONTENT_SIZE: str(self.content_size),
        }
        if self.spec.language is not None:
            ann[catalog.ANN_LANGUAGE] = self.spec.language.value
        if self.chunks is not None:
            ann.update(self.chunks.annotations())
        return Descriptor(self.spec.media_type, self.digest, self.size, ann)


@dataclass(frozen=True)
class BuiltRelease:
    """Every document of a release, as the exact bytes to push."""

    index: bytes
    manifests: Mapping[tuple[str, str], bytes]  # (os, goarch) -> manifest bytes


def platform_manifest(files: Sequence[LayerFile], info: ReleaseInfo) -> bytes:
    manifest = Manifest(
        config=EMPTY_DESCRIPTOR,
        layers=tuple(f.descriptor() for f in files),
        artifact_type=catalog.ARTIFACT_TYPE,
        annotations=info.annotations(),
    )
    return manifest.to_bytes()


def build_release(
    files_by_platform: Mapping[tuple[str, str], Sequence[LayerFile]], info: ReleaseInfo
) -> BuiltRelease:
    """One manifest per host platform plus the index, in HOST_PLATFORMS order.

    Index entries carry no artifactType: skopeo 1.9 rewrites such an index (docs/format.md §3).
    """
    manifests: dict[tuple[str, str], bytes] = {}
    entries: list[Descriptor] = []
    for os_, goarch in catalog.HOST_PLATFORMS:
        if (os_, goarch) not in files_by_platform:
            continue
        data = platform_manifest(files_by_platform[(os_, goarch)], info)
        manifests[(os_, goarch)] = data
        entries.append(
            Descriptor.for_bytes(MEDIA_TYPE_MANIFEST, data, platform=Platform(os_, goarch))
        )
    if not entries:
        raise FormatError("a release needs at least one platform")
    index = Index(tuple(entries), catalog.ARTIFACT_TYPE, info.annotations())
    return BuiltRelease(index.to_bytes(), manifests)


# GitHub Release file names (docs/format.md §6), written by the publisher's release
# folder and read by the client's releases source.
RELEASE_INDEX_FILE = "oci-index.json"
RELEASE_SIGNATURE_FILE = "oci-signature.json"
# The Sigstore bundle (keyless signature) of the index: the same bytes as the blob of
# its OCI referrer (docs/format.md §6).
RELEASE_BUNDLE_FILE = "oci-index.sigstore.json"


def release_manifest_file(os_: str, goarch: str) -> str:
    """`oci-manifest-{os}-{arch}.json`, arch as the index names it (Go naming)."""
    return f"oci-manifest-{os_}-{goarch}.json"


def release_payload_file(n: int) -> str:
    """The payload of the n-th layer (from 0) of the signature manifest."""
    return f"oci-signature-payload-{n}.json"


MAX_TITLE_LENGTH = catalog.MAX_NAME_LENGTH


@dataclass(frozen=True)
class AssetLayer:
    """A layer of a verified platform manifest, with its signed annotations checked."""

    title: str
    kind: Kind
    arch: str
    language: Language | None
    media_type: str
    digest: str
    size: int
    content_digest: str
    content_size: int
    chunks: ChunkDigests | None = None

    @property
    def compressed(self) -> bool:
        return self.title.endswith(catalog.ZST)

    @property
    def output_name(self) -> str:
        return self.title[: -len(catalog.ZST)] if self.compressed else self.title


def read_asset_layer(desc: Descriptor, where: str) -> AssetLayer:
    ann = desc.annotations
    title = ann.get(catalog.ANN_TITLE)
    if title is None:
        raise FormatError(f"layer {desc.digest} has no {catalog.ANN_TITLE}", where)
    if not catalog.is_valid_title(title) or len(title) > MAX_TITLE_LENGTH:
        shown = title if len(title) <= MAX_TITLE_LENGTH else f"{title[:MAX_TITLE_LENGTH]}..."
        raise FormatError(
            f"refusing unsafe layer title {shown!r} (at most {MAX_TITLE_LENGTH} characters)",
            where,
        )
    try:
        kind = Kind(ann.get(catalog.ANN_KIND, ""))
    except ValueError:
        raise FormatError(
            f"layer {title!r}: unknown kind {ann.get(catalog.ANN_KIND)!r}", where
        ) from None
    language = None
    if (lang := ann.get(catalog.ANN_LANGUAGE)) is not None:
        try:
            language = Language(lang)
        except ValueError:
            raise FormatError(f"layer {title!r}: unknown language {lang!r}", where) from None
    size_text = ann.get(catalog.ANN_CONTENT_SIZE, "")
    # isdigit() alone admits "²" and 5000-digit strings, on which int() raises ValueError.
    if not (size_text.isascii() and size_text.isdigit() and len(size_text) <= 19):
        raise FormatError(
            f"layer {title!r}: invalid {catalog.ANN_CONTENT_SIZE} {size_text!r}", where
        )
    content_digest = check_digest(ann.get(catalog.ANN_CONTENT_DIGEST), f"{where} layer {title!r}")
    compressed = title.endswith(catalog.ZST)
    if not compressed and (content_digest != desc.digest or int(size_text) != desc.size):
        raise FormatError(f"layer {title!r}: uncompressed layer whose content differs", where)
    return AssetLayer(
        title=title,
        kind=kind,
        arch=ann.get(catalog.ANN_ARCH, ""),
        language=language,
        media_type=desc.media_type,
        digest=desc.digest,
        size=desc.size,
        content_digest=content_digest,
        content_size=int(size_text),
        chunks=read_chunks(ann, desc.size, f"{where} layer {title!r}"),
    )


def read_asset_layers(manifest: Manifest, where: str) -> dict[str, AssetLayer]:
    """Title -> layer for every layer of a platform manifest; duplicate titles are refused."""
    out: dict[str, AssetLayer] = {}
    for desc in manifest.layers:
        layer = read_asset_layer(desc, where)
        if layer.title in out:
            raise FormatError(f"duplicate layer title {layer.title!r}", where)
        out[layer.title] = layer
    return out
