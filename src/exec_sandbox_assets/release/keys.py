"""Signing keys: ECDSA P-256 and Ed25519, PEM public keys (`cosign.pub`), encrypted
PKCS#8 private keys, and the one key pair writer.

Compatible with cosign's key-based layout: public keys are PEM SubjectPublicKeyInfo,
ECDSA P-256 signatures are ASN.1 DER over SHA-256 of the payload, Ed25519 signatures are
over the raw payload. The only I/O is reading one key file and writing one key pair,
both given as paths.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from exec_sandbox_assets.base.errors import (
    ConfigError,
)
from exec_sandbox_assets.base.fsutil import fsync_dir
from exec_sandbox_assets.release.keyid import key_id_from_der

logger = logging.getLogger(__name__)
ALGORITHMS = ("ecdsa-p256", "ed25519")

# Key files are a few hundred bytes; the cap keeps a wrong path (a disk image,
# /dev/zero) from being read whole.
_MAX_KEY_FILE = 64 * 1024

_PEM_LABEL_RE = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")

_PublicKeyObject = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
_PrivateKeyObject = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


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
        return cls(key, key_id_from_der(der), source, algorithm)

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
