"""OCI image-spec v1.1 data model: digests, descriptors, manifests, indexes, platforms.

Parsing validates (media types, digest syntax, sizes, required fields) and names the
document it read in every error. Serialization produces the exact bytes that get
digested and pushed; parsed remote documents are never re-serialized (callers keep
the bytes they fetched), so a digest always refers to bytes someone actually sent.

Knows nothing of exec-sandbox.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from exec_sandbox_assets.base import safejson
from exec_sandbox_assets.base.errors import AssetChecksumError, FormatError

MEDIA_TYPE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_EMPTY = "application/vnd.oci.empty.v1+json"
MEDIA_TYPE_IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_TYPE_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_MEDIA_TYPES = (MEDIA_TYPE_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST)
INDEX_MEDIA_TYPES = (MEDIA_TYPE_INDEX, MEDIA_TYPE_DOCKER_LIST)
# Sent as Accept on every manifest GET: distribution answers 404 without a match.
ACCEPT_MANIFESTS = (
    MEDIA_TYPE_INDEX,
    MEDIA_TYPE_MANIFEST,
    MEDIA_TYPE_DOCKER_LIST,
    MEDIA_TYPE_DOCKER_MANIFEST,
)

EMPTY_JSON = b"{}"
EMPTY_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"

# A manifest larger than this is refused before it is parsed (distribution's own limit).
MAX_MANIFEST_SIZE = 4 * 1024 * 1024

_DIGEST_RE = re.compile(r"^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$")
_MEDIA_TYPE_RE = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$"
)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def is_digest(text: str) -> bool:
    return bool(_DIGEST_RE.fullmatch(text))


def check_digest(text: object, where: str = "") -> str:
    if not isinstance(text, str) or not is_digest(text):
        raise FormatError(f"invalid digest {text!r}", where)
    return text


def digest_hex(digest: str) -> str:
    return digest.partition(":")[2]


def new_hasher(digest: str) -> Any:
    """A hashlib object for the algorithm of `digest`."""
    algo = digest.partition(":")[0]
    if algo not in ("sha256", "sha512"):
        raise FormatError(f"unsupported digest algorithm {algo!r}")
    return hashlib.new(algo)


def compute_digest(data: bytes, like: str = "sha256:") -> str:
    algo = like.partition(":")[0]
    return f"{algo}:" + hashlib.new(algo, data).hexdigest()


def verify_bytes(data: bytes, digest: str, what: str, where: str = "") -> bytes:
    """Return `data` when it hashes to `digest`, else raise AssetChecksumError."""
    actual = compute_digest(data, digest)
    if actual != digest:
        raise AssetChecksumError(what, digest, actual, where)
    return data


def canonical_json(obj: Any) -> bytes:
    """Compact, key-sorted JSON: the bytes we digest and push for documents we write."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


def _load_json(data: bytes, where: str) -> dict[str, Any]:
    # Every way hostile bytes can fail to parse is a FormatError (see safejson).
    return safejson.loads_object(data, where, max_size=MAX_MANIFEST_SIZE)


def _document(
    data: bytes, where: str, media_types: tuple[str, ...], what: str
) -> tuple[dict[str, Any], str]:
    """The parsed object and its media type (the first of `media_types` when absent)."""
    obj = _load_json(data, where)
    if obj.get("schemaVersion") != 2:
        raise FormatError("schemaVersion must be 2", where)
    media_type = obj.get("mediaType", media_types[0])
    if media_type not in media_types:
        raise FormatError(f"not {what} (mediaType {media_type!r})", where)
    return obj, media_type


def _str(obj: Mapping[str, Any], key: str, where: str, *, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise FormatError(f"missing required field {key!r}", where)
        return None
    if not isinstance(value, str):
        raise FormatError(f"field {key!r} must be a string", where)
    return value


def _media_type(value: str | None, where: str) -> str | None:
    if value is not None and not _MEDIA_TYPE_RE.fullmatch(value):
        raise FormatError(f"invalid media type {value!r}", where)
    return value


def _annotations(obj: Mapping[str, Any], where: str) -> dict[str, str]:
    value = obj.get("annotations")
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise FormatError("annotations must map strings to strings", where)
    return dict(value)


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        tail = f"/{self.variant}" if self.variant else ""
        return f"{self.os}/{self.architecture}{tail}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            out["variant"] = self.variant
        return out

    @classmethod
    def from_json(cls, obj: object, where: str) -> Platform:
        if not isinstance(obj, dict):
            raise FormatError("platform must be an object", where)
        os_ = _str(obj, "os", where)
        arch = _str(obj, "architecture", where)
        assert os_ is not None and arch is not None
        return cls(os_, arch, _str(obj, "variant", where, required=False))


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)
    artifact_type: str | None = None
    platform: Platform | None = None

    @property
    def title(self) -> str | None:
        return self.annotations.get("org.opencontainers.image.title")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform is not None:
            out["platform"] = self.platform.to_json()
        return out

    @classmethod
    def from_json(cls, obj: object, where: str) -> Descriptor:
        if not isinstance(obj, dict):
            raise FormatError("descriptor must be an object", where)
        media_type = _media_type(_str(obj, "mediaType", where), where)
        digest = check_digest(obj.get("digest"), where)
        size = obj.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise FormatError(f"invalid size {size!r} for {digest}", where)
        artifact_type = _media_type(_str(obj, "artifactType", where, required=False), where)
        platform = Platform.from_json(obj["platform"], where) if "platform" in obj else None
        assert media_type is not None
        return cls(media_type, digest, size, _annotations(obj, where), artifact_type, platform)

    @classmethod
    def for_bytes(
        cls,
        media_type: str,
        data: bytes,
        annotations: Mapping[str, str] | None = None,
        platform: Platform | None = None,
    ) -> Descriptor:
        return cls(
            media_type, sha256_digest(data), len(data), dict(annotations or {}), None, platform
        )


EMPTY_DESCRIPTOR = Descriptor(MEDIA_TYPE_EMPTY, EMPTY_DIGEST, len(EMPTY_JSON))


@dataclass(frozen=True)
class Manifest:
    config: Descriptor
    layers: tuple[Descriptor, ...]
    artifact_type: str | None = None
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)
    subject: Descriptor | None = None
    media_type: str = MEDIA_TYPE_MANIFEST

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": self.media_type,
            "config": self.config.to_json(),
            "layers": [layer.to_json() for layer in self.layers],
        }
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.subject is not None:
            out["subject"] = self.subject.to_json()
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        obj, media_type = _document(data, where, MANIFEST_MEDIA_TYPES, "an image manifest")
        if "manifests" in obj:
            raise FormatError("image manifest must not carry 'manifests'", where)
        layers = obj.get("layers")
        if not isinstance(layers, list):
            raise FormatError("missing required field 'layers'", where)
        if "config" not in obj:
            raise FormatError("missing required field 'config'", where)
        subject = Descriptor.from_json(obj["subject"], where) if "subject" in obj else None
        return cls(
            config=Descriptor.from_json(obj["config"], where),
            layers=tuple(Descriptor.from_json(layer, where) for layer in layers),
            artifact_type=_media_type(_str(obj, "artifactType", where, required=False), where),
            annotations=_annotations(obj, where),
            subject=subject,
            media_type=media_type,
        )


@dataclass(frozen=True)
class Index:
    manifests: tuple[Descriptor, ...]
    artifact_type: str | None = None
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)
    media_type: str = MEDIA_TYPE_INDEX

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": self.media_type,
            "manifests": [m.to_json() for m in self.manifests],
        }
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Index:
        # An OCI layout's index.json may omit mediaType; a pushed index must not lie.
        obj, media_type = _document(data, where, INDEX_MEDIA_TYPES, "an image index")
        manifests = obj.get("manifests")
        if not isinstance(manifests, list):
            raise FormatError("missing required field 'manifests'", where)
        return cls(
            manifests=tuple(Descriptor.from_json(m, where) for m in manifests),
            artifact_type=_media_type(_str(obj, "artifactType", where, required=False), where),
            annotations=_annotations(obj, where),
            media_type=media_type,
        )

    def for_platform(self, os_: str, architecture: str) -> Descriptor | None:
        for desc in self.manifests:
            p = desc.platform
            if p is not None and p.os == os_ and p.architecture == architecture:
                return desc
        return None


def media_type_of(data: bytes, where: str) -> str:
    """The mediaType a manifest or index declares (for layouts, which store no headers)."""
    obj = _load_json(data, where)
    media_type = obj.get("mediaType")
    if isinstance(media_type, str):
        return media_type
    return MEDIA_TYPE_INDEX if "manifests" in obj else MEDIA_TYPE_MANIFEST


def signature_tag(digest: str) -> str:
    """cosign's tag for the signature of `digest`: sha256:H -> sha256-H.sig."""
    algo, _, hexpart = digest.partition(":")
    return f"{algo}-{hexpart}.sig"


def parse_json_bytes(data: bytes, where: str) -> dict[str, Any]:
    """Public wrapper of the size-capped JSON loader, for small signed documents."""
    return _load_json(data, where)
