"""A private Sigstore instance for tests: a Fulcio-like CA, a CT log and a Rekor log,
all in memory, making DSSE bundles that sigstore-python's `Verifier` accepts.

    instance = SigstoreInstance.create()
    root = instance.write_root(tmp_path / "trusted_root.json")
    bundle = instance.bundle(statement_bytes, workflow_ref=f"{WORKFLOW}@refs/tags/v1.0.0")

What sigstore-python 4.5 checks, and so what this makes (sigstore/verify/verifier.py):
- the leaf chains to the trusted root's CA at the log's integrated time (cryptography's
  web-PKI profile: critical BasicConstraints, AKI/SKI, a critical SAN with an empty
  subject), carries KeyUsage digitalSignature and EKU codeSigning, and the Fulcio OIDC
  extensions (1.3.6.1.4.1.57264.1.x, DER UTF8String values) the identity policy reads;
- exactly one embedded SCT, over the precertificate (the TBS without the SCT list,
  with the issuer's key hash), signed by a CT log key of the root (sigstore/_internal/sct.py);
- a dsse/0.0.1 Rekor entry whose body names the payload hash and the signature with the
  leaf as verifier, a Merkle inclusion proof to a root hash, a checkpoint (signed note)
  over that root hash, and a signed entry timestamp over the RFC 8785 entry, all by a
  Rekor key of the root (models.py, _internal/merkle.py, _internal/rekor/checkpoint.py).

Every piece can be made wrong on purpose (`Flaw`), for the refusal tests. Tests only: it
imports cryptography and rfc8785 (a sigstore dependency) freely.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import struct
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import rfc8785
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

GITHUB_ISSUER = "https://token.actions.githubusercontent.com"
INTOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"

# Fulcio's certificate extensions (https://github.com/sigstore/fulcio/blob/main/docs/oid-info.md)
OID_ISSUER_V1 = "1.3.6.1.4.1.57264.1.1"
OID_ISSUER_V2 = "1.3.6.1.4.1.57264.1.8"
OID_BUILD_SIGNER_URI = "1.3.6.1.4.1.57264.1.9"
OID_SOURCE_REPOSITORY_URI = "1.3.6.1.4.1.57264.1.12"
OID_SOURCE_REPOSITORY_REF = "1.3.6.1.4.1.57264.1.14"
OID_BUILD_CONFIG_URI = "1.3.6.1.4.1.57264.1.18"
OID_BUILD_TRIGGER = "1.3.6.1.4.1.57264.1.20"
OID_SCT_LIST = "1.3.6.1.4.1.11129.2.4.2"

EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
# Other entries of the log: the inclusion proof then has hashes to check.
TREE_SIZE = 6
LOG_INDEX = 4


class Flaw(Enum):
    """One thing made wrong in a bundle."""

    NO_SCT = "no SCT in the certificate"
    SET = "tampered signed entry timestamp (integrated time changed)"
    CHECKPOINT = "tampered checkpoint signature"
    PROOF = "tampered inclusion proof hash"
    EXPIRED = "certificate expired at the logged time"
    DSSE_SIGNATURE = "envelope signature by another key"


def _utf8_der(text: str) -> bytes:
    return b"\x0c" + _der_length(len(text.encode())) + text.encode()


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _key_id(key: ec.EllipticCurvePublicKey) -> bytes:
    return hashlib.sha256(_spki(key)).digest()


def _sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    return key.sign(data, ec.ECDSA(hashes.SHA256()))


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


# -- RFC 6962 Merkle tree -------------------------------------------------------------


def _leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def _node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def _tree_hash(leaves: list[bytes]) -> bytes:
    if len(leaves) == 1:
        return leaves[0]
    k = _split(len(leaves))
    return _node_hash(_tree_hash(leaves[:k]), _tree_hash(leaves[k:]))


def _audit_path(m: int, leaves: list[bytes]) -> list[bytes]:
    if len(leaves) == 1:
        return []
    k = _split(len(leaves))
    if m < k:
        return [*_audit_path(m, leaves[:k]), _tree_hash(leaves[k:])]
    return [*_audit_path(m - k, leaves[k:]), _tree_hash(leaves[:k])]


# -- the instance ---------------------------------------------------------------------


@dataclass
class SigstoreInstance:
    name: str
    root_key: ec.EllipticCurvePrivateKey
    root_cert: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    ct_key: ec.EllipticCurvePrivateKey
    rekor_key: ec.EllipticCurvePrivateKey
    origin: str = field(default="")

    @classmethod
    def create(cls, name: str = "test-sigstore") -> SigstoreInstance:
        root_key, ca_key = _new_key(), _new_key()
        start, end = EPOCH - dt.timedelta(days=365), EPOCH + dt.timedelta(days=3650)
        root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} root")])
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} intermediate")])
        root_cert = _ca_cert(root_name, root_key, root_name, root_key, start, end, None)
        ca_cert = _ca_cert(ca_name, ca_key, root_name, root_key, start, end, 0)
        return cls(
            name, root_key, root_cert, ca_key, ca_cert, _new_key(), _new_key(), f"{name}.log"
        )

    # -- trusted root ----------------------------------------------------------------

    def trusted_root(self) -> dict[str, object]:
        """The instance as a `trusted_root.json` document (sigstore protobuf-specs JSON)."""

        def log(url: str, key: ec.EllipticCurvePrivateKey) -> dict[str, object]:
            return {
                "baseUrl": url,
                "hashAlgorithm": "SHA2_256",
                "publicKey": {
                    "rawBytes": _b64(_spki(key.public_key())),
                    "keyDetails": "PKIX_ECDSA_P256_SHA_256",
                    "validFor": {"start": "2024-01-01T00:00:00Z"},
                },
                "logId": {"keyId": _b64(_key_id(key.public_key()))},
            }

        chain = [self.ca_cert, self.root_cert]
        return {
            "mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
            "tlogs": [log(f"https://rekor.{self.name}.invalid", self.rekor_key)],
            "certificateAuthorities": [
                {
                    "subject": {"organization": self.name, "commonName": self.name},
                    "uri": f"https://fulcio.{self.name}.invalid",
                    "certChain": {
                        "certificates": [
                            {"rawBytes": _b64(c.public_bytes(serialization.Encoding.DER))}
                            for c in chain
                        ]
                    },
                    "validFor": {"start": "2024-01-01T00:00:00Z"},
                }
            ],
            "ctlogs": [log(f"https://ctfe.{self.name}.invalid", self.ct_key)],
            "timestampAuthorities": [],
        }

    def write_root(self, path: Path) -> Path:
        path.write_text(json.dumps(self.trusted_root(), indent=2))
        return path

    # -- bundles ---------------------------------------------------------------------

    def bundle(
        self,
        payload: bytes,
        *,
        workflow_ref: str,
        issuer: str = GITHUB_ISSUER,
        repository: str | None = None,
        flaw: Flaw | None = None,
        payload_type: str = INTOTO_PAYLOAD_TYPE,
    ) -> bytes:
        """A DSSE bundle over `payload` by a leaf certificate for the GitHub Actions
        identity `workflow_ref` (`https://github.com/O/R/.github/workflows/F@REF`), whose
        source repository is `repository` (default: the one in `workflow_ref`)."""
        leaf_key = _new_key()
        issued = EPOCH
        integrated = issued + dt.timedelta(minutes=2)
        not_after = issued + dt.timedelta(minutes=10)
        if flaw is Flaw.EXPIRED:
            not_after = issued + dt.timedelta(minutes=1)
        if repository is None:
            repository = workflow_ref.split("/.github/", 1)[0]
        ref = workflow_ref.rpartition("@")[2]
        cert = self._leaf(leaf_key, workflow_ref, issuer, repository, ref, issued, not_after, flaw)

        pae = (
            f"DSSEv1 {len(payload_type)} {payload_type} ".encode()
            + f"{len(payload)} ".encode()
            + payload
        )
        signer = _new_key() if flaw is Flaw.DSSE_SIGNATURE else leaf_key
        signature = _sign(signer, pae)
        envelope = {
            "payload": _b64(payload),
            "payloadType": payload_type,
            "signatures": [{"sig": _b64(signature)}],
        }
        pem = cert.public_bytes(serialization.Encoding.PEM)
        body = rfc8785.dumps(
            {
                "apiVersion": "0.0.1",
                "kind": "dsse",
                "spec": {
                    "envelopeHash": {
                        "algorithm": "sha256",
                        "value": hashlib.sha256(json.dumps(envelope).encode()).hexdigest(),
                    },
                    "payloadHash": {
                        "algorithm": "sha256",
                        "value": hashlib.sha256(payload).hexdigest(),
                    },
                    "signatures": [{"signature": _b64(signature), "verifier": _b64(pem)}],
                },
            }
        )
        entry = self._log_entry(body, int(integrated.timestamp()), flaw)
        return json.dumps(
            {
                "mediaType": BUNDLE_MEDIA_TYPE,
                "verificationMaterial": {
                    "certificate": {
                        "rawBytes": _b64(cert.public_bytes(serialization.Encoding.DER))
                    },
                    "tlogEntries": [entry],
                },
                "dsseEnvelope": envelope,
            }
        ).encode()

    def _leaf(
        self,
        key: ec.EllipticCurvePrivateKey,
        workflow_ref: str,
        issuer: str,
        repository: str,
        ref: str,
        not_before: dt.datetime,
        not_after: dt.datetime,
        flaw: Flaw | None,
    ) -> x509.Certificate:
        fulcio = [
            (OID_ISSUER_V1, issuer.encode()),
            (OID_ISSUER_V2, _utf8_der(issuer)),
            (OID_BUILD_SIGNER_URI, _utf8_der(workflow_ref)),
            (OID_SOURCE_REPOSITORY_URI, _utf8_der(repository)),
            (OID_SOURCE_REPOSITORY_REF, _utf8_der(ref)),
            (OID_BUILD_CONFIG_URI, _utf8_der(workflow_ref)),
            (OID_BUILD_TRIGGER, _utf8_der("push")),
        ]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()),
                False,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(workflow_ref)]),
                critical=True,
            )
        )
        for oid, value in fulcio:
            builder = builder.add_extension(
                x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), critical=False
            )
        if flaw is Flaw.NO_SCT:
            return builder.sign(self.ca_key, hashes.SHA256())
        # Precertificate flow: the SCT signs the TBS as it is without the SCT list (what
        # `tbs_precertificate_bytes` gives back from the final certificate).
        precert = builder.sign(self.ca_key, hashes.SHA256())
        sct = self._sct(precert.tbs_certificate_bytes, not_before)
        scts = struct.pack("!H", len(sct)) + sct
        tls_list = struct.pack("!H", len(scts)) + scts
        octets = b"\x04" + _der_length(len(tls_list)) + tls_list
        final = builder.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(OID_SCT_LIST), octets), False
        ).sign(self.ca_key, hashes.SHA256())
        assert final.tbs_precertificate_bytes == precert.tbs_certificate_bytes
        return final

    def _sct(self, tbs: bytes, when: dt.datetime) -> bytes:
        timestamp = int(when.timestamp() * 1000)
        issuer_key_hash = _key_id(self.ca_key.public_key())
        entry = issuer_key_hash + len(tbs).to_bytes(3, "big") + tbs
        signed = struct.pack("!BBQH", 0, 0, timestamp, 1) + entry + struct.pack("!H", 0)
        signature = _sign(self.ct_key, signed)
        return (
            b"\x00"  # v1
            + _key_id(self.ct_key.public_key())
            + struct.pack("!Q", timestamp)
            + struct.pack("!H", 0)  # no extensions
            + bytes([4, 3])  # sha256, ecdsa
            + struct.pack("!H", len(signature))
            + signature
        )

    def _log_entry(self, body: bytes, integrated: int, flaw: Flaw | None) -> dict[str, object]:
        others = [_leaf_hash(f"entry {n}".encode()) for n in range(TREE_SIZE)]
        leaves = [*others[:LOG_INDEX], _leaf_hash(body), *others[LOG_INDEX + 1 :]]
        root = _tree_hash(leaves)
        path = _audit_path(LOG_INDEX, leaves)
        if flaw is Flaw.PROOF:
            path[0] = hashlib.sha256(path[0]).digest()
        log_id = _key_id(self.rekor_key.public_key())

        note = f"{self.origin} - 1\n{TREE_SIZE}\n{_b64(root)}\n"
        note_key = self.rekor_key if flaw is not Flaw.CHECKPOINT else _new_key()
        note_signature = log_id[:4] + _sign(note_key, note.encode())
        checkpoint = f"{note}\n\u2014 {self.origin} {_b64(note_signature)}\n"

        set_payload = rfc8785.dumps(
            {
                "body": _b64(body),
                "integratedTime": integrated,
                "logID": log_id.hex(),
                "logIndex": LOG_INDEX,
            }
        )
        signed_entry_timestamp = _sign(self.rekor_key, set_payload)
        if flaw is Flaw.SET:
            integrated -= 60  # what the SET signed no longer matches the entry
        return {
            "logIndex": str(LOG_INDEX),
            "logId": {"keyId": _b64(log_id)},
            "kindVersion": {"kind": "dsse", "version": "0.0.1"},
            "integratedTime": str(integrated),
            "inclusionPromise": {"signedEntryTimestamp": _b64(signed_entry_timestamp)},
            "inclusionProof": {
                "logIndex": str(LOG_INDEX),
                "rootHash": _b64(root),
                "treeSize": str(TREE_SIZE),
                "hashes": [_b64(h) for h in path],
                "checkpoint": {"envelope": checkpoint},
            },
            "canonicalizedBody": _b64(body),
        }


def _ca_cert(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    start: dt.datetime,
    end: dt.datetime,
    path_length: int | None,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    )
    if path_length is not None:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), False
        )
    return builder.sign(issuer_key, hashes.SHA256())


__all__ = ["GITHUB_ISSUER", "Flaw", "SigstoreInstance"]
