"""Signing keys, cosign "simple signing" payloads, signature manifests, and the policy
that decides whether an index is trusted (SPEC.md section 5).

Pure: bytes in, verified objects or a `TrustError` out. No network, no environment;
the only I/O is reading one key file and writing one key pair, both given as paths.
The caller (the fetcher) fetches the signature manifest and each payload blob by its
verified digest, then asks `verify_index`.

Compatibility with cosign's key-based, legacy (`--new-bundle-format=false`) layout:
ECDSA P-256 signatures are ASN.1 DER over SHA-256 of the payload, Ed25519 signatures
are over the raw payload, public keys are PEM SubjectPublicKeyInfo (`cosign.pub`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from exec_sandbox_assets.errors import (
    ConfigError,
    FormatError,
    NoTrustedKeysError,
    RollbackError,
    SignatureError,
    VersionMismatchError,
)
from exec_sandbox_assets.fsutil import fsync_dir
from exec_sandbox_assets.oci.model import (
    MEDIA_TYPE_IMAGE_CONFIG,
    Descriptor,
    Manifest,
    canonical_json,
    check_digest,
    is_digest,
)

logger = logging.getLogger(__name__)

SIMPLESIGNING_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
PAYLOAD_TYPE = "cosign container image signature"
OPT_VERSION = "dev.exec-sandbox.version"
OPT_CREATED = "dev.exec-sandbox.created"

ALGORITHMS = ("ecdsa-p256", "ed25519")

# Key files are a few hundred bytes; the cap keeps a wrong path (a disk image,
# /dev/zero) from being read whole.
_MAX_KEY_FILE = 64 * 1024
# Payloads are ~300 bytes; anything near this is not a simple-signing payload.
_MAX_PAYLOAD = 64 * 1024
# Each signature layer costs the caller one payload fetch and one check per key; a
# rotation needs two or three. The signature manifest is unsigned: anyone serving it
# could otherwise make the client fetch thousands of payloads.
MAX_SIGNATURE_LAYERS = 64

_PEM_LABEL_RE = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")

_PublicKeyObject = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
_PrivateKeyObject = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

_HOW_TO_CONFIGURE = (
    "configure a trusted public key (PEM 'PUBLIC KEY', as `cosign verify --key` takes): "
    "set EXEC_SANDBOX_TRUSTED_KEYS=/path/key.pub or pass trusted_keys=[...]; "
    "to skip verification anyway (insecure), set EXEC_SANDBOX_INSECURE_SKIP_VERIFY=1"
)


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class PublicKey:
    """A trusted (or candidate) verification key."""

    key: _PublicKeyObject = field(repr=False, compare=False)
    key_id: str  # sha256 hex of the DER SubjectPublicKeyInfo
    # Only a label for messages: the same key loaded from two paths is the same key.
    source: str = field(compare=False)
    algorithm: str  # "ecdsa-p256" | "ed25519"

    @classmethod
    def from_key(cls, key: _PublicKeyObject, source: str) -> PublicKey:
        algorithm = _public_algorithm(key, source)
        der = key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return cls(key, hashlib.sha256(der).hexdigest(), source, algorithm)

    def verify(self, signature: bytes, data: bytes) -> bool:
        try:
            if isinstance(self.key, ec.EllipticCurvePublicKey):
                self.key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
            else:
                self.key.verify(signature, data)
        # Malformed DER may surface as ValueError depending on the backend version.
        except (InvalidSignature, ValueError):
            return False
        return True

    def pem(self) -> bytes:
        return self.key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def describe(self) -> str:
        return f"{self.key_id[:16]} ({self.algorithm}, {self.source})"


@dataclass(frozen=True)
class SigningKey:
    """A private key with its public half."""

    key: _PrivateKeyObject = field(repr=False, compare=False)
    public: PublicKey

    def sign(self, data: bytes) -> bytes:
        if isinstance(self.key, ec.EllipticCurvePrivateKey):
            return self.key.sign(data, ec.ECDSA(hashes.SHA256()))
        return self.key.sign(data)

    def private_pem(self, password: bytes | None) -> bytes:
        """PKCS#8 PEM; encrypted when a (non-empty) password is given."""
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password)
            if password
            else serialization.NoEncryption()
        )
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )


def _public_algorithm(key: _PublicKeyObject, source: str) -> str:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "ed25519"
    if not isinstance(key.curve, ec.SECP256R1):
        raise _unsupported(f"EC key on curve {key.curve.name}", source)
    return "ecdsa-p256"


def _unsupported(what: str, source: str) -> ConfigError:
    return ConfigError(
        f"{source}: {what} is not supported; only ECDSA P-256 (cosign's default) "
        "and Ed25519 keys are accepted"
    )


def _key_kind(key: object) -> str:
    # "RSAPublicKey" -> "RSA": enough to tell the user what they gave.
    name = type(key).__name__.lstrip("_")
    for suffix in ("PublicKey", "PrivateKey"):
        name = name.removesuffix(suffix)
    return name or "this"


def _pem_labels(data: bytes) -> list[str]:
    return [m.decode("ascii") for m in _PEM_LABEL_RE.findall(data)]


def generate_key(algorithm: str = "ecdsa-p256") -> SigningKey:
    private: _PrivateKeyObject
    if algorithm == "ecdsa-p256":
        private = ec.generate_private_key(ec.SECP256R1())
    elif algorithm == "ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ConfigError(
            f"unsupported key algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}"
        )
    return SigningKey(private, PublicKey.from_key(private.public_key(), "generated"))


def load_public_key(data: bytes, source: str) -> PublicKey:
    """Parse a PEM `PUBLIC KEY` (SubjectPublicKeyInfo), the file `cosign verify --key` takes."""
    labels = _pem_labels(data)
    if any("PRIVATE KEY" in label for label in labels):
        raise ConfigError(
            f"{source}: contains a private key ({labels[0]}); a trusted key must be the "
            "public half (PEM 'PUBLIC KEY', e.g. cosign.pub)"
        )
    if "PUBLIC KEY" not in labels:
        found = f"found {labels[0]!r}" if labels else "no PEM block found"
        raise ConfigError(
            f"{source}: not a PEM public key ({found}); expected "
            "'-----BEGIN PUBLIC KEY-----' (SubjectPublicKeyInfo, as written by "
            "`cosign generate-key-pair`)"
        )
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{source}: cannot parse public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise _unsupported(f"{_key_kind(key)} key", source)
    return PublicKey.from_key(key, source)


def load_public_key_file(path: Path) -> PublicKey:
    return load_public_key(_read_key_file(path, "public key"), str(path))


def load_signing_key(data: bytes, source: str, password: bytes | None) -> SigningKey:
    """Parse a PEM private key: PKCS#8 (encrypted or not) or SEC1 `EC PRIVATE KEY`.

    An empty password means none. A password given for an unencrypted key is ignored:
    the key is usable and refusing it would only get in the way.
    """
    labels = _pem_labels(data)
    if any("SIGSTORE" in label or "COSIGN" in label for label in labels):
        raise ConfigError(
            f"{source}: cosign's own encrypted key format ({labels[0]}) cannot be read; "
            "use a PEM PKCS#8 private key (e.g. `openssl genpkey -algorithm EC "
            "-pkeyopt ec_paramgen_curve:P-256`, or a key written by this tool)"
        )
    if labels and all("PUBLIC KEY" in label for label in labels):
        raise ConfigError(
            f"{source}: contains a public key ({labels[0]}); signing needs the private key"
        )
    if not any("PRIVATE KEY" in label for label in labels):
        found = f"found {labels[0]!r}" if labels else "no PEM block found"
        raise ConfigError(
            f"{source}: not a PEM private key ({found}); expected "
            "'-----BEGIN PRIVATE KEY-----', '-----BEGIN ENCRYPTED PRIVATE KEY-----' "
            "or '-----BEGIN EC PRIVATE KEY-----'"
        )
    password = password or None
    try:
        key = serialization.load_pem_private_key(data, password)
    except TypeError as exc:
        if password is None:
            raise ConfigError(
                f"{source}: the private key is encrypted; a password is required"
            ) from None
        if "not encrypted" not in str(exc):
            raise ConfigError(f"{source}: cannot load private key: {exc}") from None
        key = serialization.load_pem_private_key(data, None)
    except ValueError as exc:
        if password is not None and "decrypt" in str(exc).lower():
            raise ConfigError(f"{source}: wrong password for the encrypted private key") from None
        # cryptography words a wrong password and a corrupt key the same way at times.
        hint = " (or the password is wrong)" if password is not None else ""
        raise ConfigError(f"{source}: cannot load private key{hint}: {exc}") from None
    except UnsupportedAlgorithm as exc:
        raise ConfigError(f"{source}: unsupported private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise _unsupported(f"{_key_kind(key)} key", source)
    return SigningKey(key, PublicKey.from_key(key.public_key(), source))


def load_signing_key_file(path: Path, password: bytes | None) -> SigningKey:
    return load_signing_key(_read_key_file(path, "private key"), str(path), password)


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_KEY_FILE + 1)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"{path}: cannot read {what} file: {reason}") from None
    if len(data) > _MAX_KEY_FILE:
        raise ConfigError(f"{path}: larger than {_MAX_KEY_FILE} bytes; not a {what} file")
    return data


def write_key_pair(
    key: SigningKey, private_path: Path, public_path: Path, password: bytes | None
) -> None:
    """Write the private key (mode 0o600) and the public key; never overwrite either.

    Each file appears whole or not at all (temp file in the same directory, fsync,
    then a no-replace link into place). If the public key cannot be written, the
    private key just written is removed so no half pair is left behind.
    """
    if private_path.resolve() == public_path.resolve():
        raise ConfigError(f"{private_path}: private and public key paths must differ")
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise ConfigError(f"{path}: already exists; refusing to overwrite a key file")
    _write_new_file(private_path, key.private_pem(password), 0o600)
    try:
        _write_new_file(public_path, key.public.pem(), 0o644)
    except BaseException:
        with contextlib.suppress(OSError):
            private_path.unlink()
        raise


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    directory = path.parent
    try:
        # mkstemp creates the file 0o600 whatever the umask: the secret is never
        # readable by others, not even for a moment.
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot create file: {exc.strerror or exc}") from None
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), mode)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            _link_no_replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        fsync_dir(directory)
    except FileExistsError:
        raise ConfigError(f"{path}: already exists; refusing to overwrite a key file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write key file: {exc.strerror or exc}") from None


def _link_no_replace(tmp: Path, path: Path) -> None:
    # rename() would silently replace a file created since our check; link() fails
    # with EEXIST instead. Some file systems have no hard links: fall back to a
    # checked rename there (a narrow race, on file systems that leave no choice).
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if path.exists():
            raise FileExistsError(errno.EEXIST, "file exists", str(path)) from None
        tmp.rename(path)


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
    """The simple-signing payload, byte for byte as cosign writes it (SPEC.md section 5).

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


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Parsers disagree on which duplicate wins; a signed document must not be ambiguous.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_payload(data: bytes, where: str) -> SignedPayload:
    if len(data) > _MAX_PAYLOAD:
        raise FormatError(f"signature payload of {len(data)} bytes is too large", where)
    try:
        doc = json.loads(data, object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # deep nesting recurses
        raise FormatError(f"signature payload is not valid JSON: {exc}", where) from None
    doc = _obj(doc, "payload", where)
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


def build_signature_manifest(entries: Sequence[tuple[bytes, bytes]]) -> SignatureManifest:
    """cosign's legacy layout: one simple-signing layer per (payload, signature)."""
    if not entries:
        raise ConfigError("a signature manifest needs at least one signature")
    layers = tuple(
        Descriptor.for_bytes(
            SIMPLESIGNING_MEDIA_TYPE,
            payload,
            {SIGNATURE_ANNOTATION: base64.b64encode(signature).decode("ascii")},
        )
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
    try:
        manifest = Manifest.from_bytes(data, where)
    except RecursionError as exc:  # json.loads on deeply nested arrays
        raise FormatError(f"not valid JSON: {exc}", where) from None
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
                "signature layer without signature annotation skipped",
                extra={"where": where, "layer_digest": layer.digest},
            )
            continue
        try:
            # Strict alphabet, but line breaks are dropped: some tools wrap long base64.
            signature = base64.b64decode("".join(encoded.split()), validate=True)
        except (binascii.Error, ValueError):
            logger.debug(
                "signature layer with invalid base64 skipped",
                extra={"where": where, "layer_digest": layer.digest},
            )
            continue
        if not signature:
            continue
        out.append(SignatureLayer(layer.digest, layer.size, signature))
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
    return build_signature_manifest([(payload, key.sign(payload)) for key in unique])


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


__all__ = [
    "ALGORITHMS",
    "MAX_SIGNATURE_LAYERS",
    "OPT_CREATED",
    "OPT_VERSION",
    "PAYLOAD_TYPE",
    "SIGNATURE_ANNOTATION",
    "SIMPLESIGNING_MEDIA_TYPE",
    "PublicKey",
    "SignatureLayer",
    "SignatureManifest",
    "SignedPayload",
    "SigningKey",
    "TrustPolicy",
    "VerifiedRelease",
    "build_signature_manifest",
    "generate_key",
    "load_public_key",
    "load_public_key_file",
    "load_signing_key",
    "load_signing_key_file",
    "make_payload",
    "parse_payload",
    "parse_timestamp",
    "read_signature_manifest",
    "sign_index",
    "verify_index",
    "write_key_pair",
]
