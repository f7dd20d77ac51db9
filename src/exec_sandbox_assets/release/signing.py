"""cosign "simple signing" payloads and signature manifests (the wire format of a
release signature; docs/format.md §5).

Pure: bytes in, parsed objects or a `FormatError` out; building a signature manifest
is the publisher's half of the same format.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from exec_sandbox_assets.base import safejson
from exec_sandbox_assets.base.errors import (
    ConfigError,
    FormatError,
    SignatureError,
)
from exec_sandbox_assets.oci.model import (
    MEDIA_TYPE_IMAGE_CONFIG,
    Descriptor,
    Manifest,
    canonical_json,
    check_digest,
    is_digest,
)

if TYPE_CHECKING:  # cryptography is needed to sign, not to parse
    from exec_sandbox_assets.release.keys import SigningKey

logger = logging.getLogger(__name__)

SIMPLESIGNING_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
PAYLOAD_TYPE = "cosign container image signature"
OPT_VERSION = "dev.exec-sandbox.version"
OPT_CREATED = "dev.exec-sandbox.created"
# On a signature layer: the id of the key that made it (sha256 hex of its DER public key,
# docs/format.md §5). Unsigned, so a claim only: it names the signer in an error ("signed
# by key X, not trusted") and never counts toward acceptance.
KEY_ID_ANNOTATION = "dev.exec-sandbox.key-id"
_KEY_ID_RE = re.compile(r"^[0-9a-f]{64}$")

# Payloads are ~300 bytes; anything near this is not a simple-signing payload. The one
# cap every reader of a payload applies (sources, the publisher's read-back).
MAX_PAYLOAD_SIZE = 64 * 1024
# Each signature layer costs the caller one payload fetch and one check per key; a
# rotation needs two or three. The signature manifest is unsigned: anyone serving it
# could otherwise make the client fetch thousands of payloads.
MAX_SIGNATURE_LAYERS = 64

# --------------------------------------------------------------------------- payloads


@dataclass(frozen=True)
class SignedPayload:
    digest: str
    docker_reference: str
    version: str | None
    created: str | None
    raw: bytes = field(repr=False)


def make_payload(
    index_digest: str, docker_reference: str, version: str | None, created: str | None
) -> bytes:
    """The simple-signing payload, byte for byte as cosign writes it (docs/format.md §5).

    With neither version nor created, `optional` is `null`, as cosign writes it.
    """
    if not is_digest(index_digest):
        raise ConfigError(f"invalid index digest {index_digest!r}")
    if created is not None:
        try:
            parse_timestamp(created)
        except ValueError:
            raise ConfigError(f"created {created!r} is not an RFC 3339 timestamp") from None
    optional: dict[str, str] = {}
    if version is not None:
        optional[OPT_VERSION] = version
    if created is not None:
        optional[OPT_CREATED] = created
    # Key order matters (bytes are what is signed), so no sort_keys here.
    doc = {
        "critical": {
            "identity": {"docker-reference": docker_reference},
            "image": {"docker-manifest-digest": index_digest},
            "type": PAYLOAD_TYPE,
        },
        "optional": optional or None,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def parse_payload(data: bytes, where: str) -> SignedPayload:
    # Duplicate keys are refused: parsers disagree on which one wins, and a signed
    # document must not be ambiguous.
    doc = safejson.loads_object(data, where, what="signature payload", max_size=MAX_PAYLOAD_SIZE)
    critical = _obj(doc.get("critical"), "critical", where)
    if critical.get("type") != PAYLOAD_TYPE:
        raise FormatError(
            f"signature payload type {critical.get('type')!r} is not {PAYLOAD_TYPE!r}", where
        )
    image = _obj(critical.get("image"), "critical.image", where)
    digest = image.get("docker-manifest-digest")
    if digest is None:
        raise FormatError("signature payload has no docker-manifest-digest", where)
    check_digest(digest, where)
    identity = _obj(critical.get("identity"), "critical.identity", where)
    reference = identity.get("docker-reference")
    if not isinstance(reference, str):
        raise FormatError("critical.identity.docker-reference must be a string", where)
    optional = doc.get("optional")
    if optional is None:
        optional = {}
    optional = _obj(optional, "optional", where)
    version = _opt_str(optional, OPT_VERSION, where)
    created = _opt_str(optional, OPT_CREATED, where)
    if created is not None:
        try:
            parse_timestamp(created)
        except ValueError:
            raise FormatError(f"{OPT_CREATED} {created!r} is not RFC 3339", where) from None
    return SignedPayload(digest, reference, version, created, bytes(data))


def _obj(value: object, name: str, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FormatError(f"signature payload: {name} must be a JSON object", where)
    return value


def _opt_str(optional: dict[str, Any], key: str, where: str) -> str | None:
    value = optional.get(key)
    if value is not None and not isinstance(value, str):
        raise FormatError(f"signature payload: optional {key!r} must be a string", where)
    return value


def parse_timestamp(text: str) -> datetime:
    """RFC 3339 -> aware datetime (naive ones are taken as UTC). ValueError if invalid."""
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"
    value = datetime.fromisoformat(text)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


# --------------------------------------------------------------------------- manifests


@dataclass(frozen=True)
class SignatureManifest:
    """A signature manifest as pushed: its bytes, its config blob, one payload per layer."""

    manifest: bytes
    config: bytes
    payloads: tuple[bytes, ...]


@dataclass(frozen=True)
class SignatureLayer:
    payload_digest: str
    payload_size: int
    signature: bytes
    key_id: str | None = None  # the signer the layer names (KEY_ID_ANNOTATION), unverified


def build_signature_manifest(
    entries: Sequence[tuple[bytes, bytes]], key_ids: Mapping[bytes, str] | None = None
) -> SignatureManifest:
    """cosign's legacy layout: one simple-signing layer per (payload, signature); the
    layer of a signature found in `key_ids` (signature -> key id) names its key."""
    if not entries:
        raise ConfigError("a signature manifest needs at least one signature")
    named = key_ids or {}

    def annotations(signature: bytes) -> dict[str, str]:
        ann = {SIGNATURE_ANNOTATION: base64.b64encode(signature).decode("ascii")}
        if signature in named:
            ann[KEY_ID_ANNOTATION] = named[signature]
        return ann

    layers = tuple(
        Descriptor.for_bytes(SIMPLESIGNING_MEDIA_TYPE, payload, annotations(signature))
        for payload, signature in entries
    )
    config = canonical_json(
        {
            "architecture": "",
            "os": "",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]},
        }
    )
    manifest = Manifest(config=Descriptor.for_bytes(MEDIA_TYPE_IMAGE_CONFIG, config), layers=layers)
    return SignatureManifest(manifest.to_bytes(), config, tuple(p for p, _ in entries))


def read_signature_manifest(data: bytes, where: str) -> tuple[SignatureLayer, ...]:
    """The signature layers of a signature manifest; other layers and the config are
    ignored, so manifests written by cosign or other tools are read too."""
    manifest = Manifest.from_bytes(data, where)
    layers = [layer for layer in manifest.layers if layer.media_type == SIMPLESIGNING_MEDIA_TYPE]
    if len(layers) > MAX_SIGNATURE_LAYERS:
        raise SignatureError(
            f"{where}: {len(layers)} signature layers, more than the {MAX_SIGNATURE_LAYERS} "
            "a client checks; refusing"
        )
    out: list[SignatureLayer] = []
    for layer in layers:
        encoded = layer.annotations.get(SIGNATURE_ANNOTATION)
        # Not fatal: another layer may still carry a valid signature.
        if not encoded:
            logger.debug(
                "%s: signature layer %s without signature annotation skipped",
                where,
                layer.digest,
                extra={"where": where, "layer_digest": layer.digest},
            )
            continue
        try:
            # Strict alphabet, but line breaks are dropped: some tools wrap long base64.
            signature = base64.b64decode("".join(encoded.split()), validate=True)
        except (binascii.Error, ValueError):
            logger.debug(
                "%s: signature layer %s with invalid base64 skipped",
                where,
                layer.digest,
                extra={"where": where, "layer_digest": layer.digest},
            )
            continue
        if not signature:
            continue
        claimed = layer.annotations.get(KEY_ID_ANNOTATION)
        key_id = claimed if claimed is not None and _KEY_ID_RE.fullmatch(claimed) else None
        out.append(SignatureLayer(layer.digest, layer.size, signature, key_id))
    return tuple(out)


def sign_index(
    keys: Sequence[SigningKey],
    index_digest: str,
    docker_reference: str,
    version: str | None,
    created: str | None,
) -> SignatureManifest:
    """One payload, signed by each key (during a key rotation: old and new)."""
    unique = list({k.public.key_id: k for k in keys}.values())
    if not unique:
        raise ConfigError("no signing key given")
    payload = make_payload(index_digest, docker_reference, version, created)
    signed = [(key.public.key_id, key.sign(payload)) for key in unique]
    return build_signature_manifest(
        [(payload, signature) for _, signature in signed],
        {signature: key_id for key_id, signature in signed},
    )
