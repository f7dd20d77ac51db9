"""Docker token auth (``GET /token`` issuing ES256 JWTs), as ghcr.io does it."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from servers.threaded import QuietHandler, ThreadedServer, TrackingHTTPServer
from servers.tls import utc_now


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def libtrust_key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """Key id distribution matches a JWT ``kid`` against: base32 of the first
    30 bytes of SHA-256 over the DER SubjectPublicKeyInfo, 12 groups of 4."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode("ascii").rstrip("=")
    return ":".join(b32[i : i + 4] for i in range(0, len(b32), 4))


@dataclass
class TokenRequest:
    """One request to the token endpoint."""

    path: str
    query: dict[str, list[str]]
    authorization: bool
    user: str | None
    status: int
    granted: list[dict[str, Any]] = field(default_factory=list)


class _TokenHandler(QuietHandler):
    def do_GET(self) -> None:
        owner = cast(TokenServer, cast(TrackingHTTPServer, self.server).owner)
        status, body, headers = owner._handle(self.path, self.headers.get("Authorization"))
        self._send_simple(status, body, headers)


class TokenServer(ThreadedServer):
    """Docker token-auth endpoint (``GET /token``) issuing ES256 JWTs.

    Anonymous requests get only ``pull`` on the repositories they ask for
    (public-package behaviour of ghcr.io); correct HTTP Basic credentials of a
    configured user get every action asked for; wrong credentials get 401.
    ``requests`` records every call. Set ``token_ttl`` to make tokens expire
    sooner (distribution adds 60 s of leeway on exp).
    """

    _handler = _TokenHandler

    def __init__(
        self,
        directory: Path,
        users: dict[str, str] | None = None,
        *,
        service: str = "exec-sandbox-test-registry",
        issuer: str = "exec-sandbox-test-issuer",
        token_ttl: int = 300,
    ) -> None:
        super().__init__()
        self.users: dict[str, str] = dict(users or {})
        self.service = service
        self.issuer = issuer
        self.token_ttl = token_ttl
        self.requests: list[TokenRequest] = []
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.kid = libtrust_key_id(self._key.public_key())
        directory.mkdir(parents=True, exist_ok=True)
        self.cert_bundle = directory / "token-signing.pem"
        self.cert_bundle.write_bytes(self._self_signed_cert())

    def _self_signed_cert(self) -> bytes:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.issuer)])
        start = utc_now() - dt.timedelta(minutes=5)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=2))
            .sign(self._key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    def make_token(self, access: list[dict[str, Any]], subject: str = "") -> str:
        """Sign a registry JWT granting ``access`` (also usable directly by tests)."""
        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "kid": self.kid}
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + self.token_ttl,
            "nbf": now - 5,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        der = self._key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
        # JWS ES256 wants raw r||s (32 bytes each), not the ASN.1 DER cryptography returns.
        r, s = decode_dss_signature(der)
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return signing_input + "." + _b64url(sig)

    def _check_basic(self, authorization: str) -> str | None:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        return user if self.users.get(user) == password and user else None

    @staticmethod
    def _parse_scope(scope: str) -> tuple[str, str, list[str]] | None:
        # "repository:name/with/slashes:pull,push"; the type may carry "(class)".
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        if not kind or not name:
            return None
        return kind, name, [a for a in actions.split(",") if a]

    def _handle(
        self, raw_path: str, authorization: str | None
    ) -> tuple[int, bytes, list[tuple[str, str]]]:
        parsed = urllib.parse.urlsplit(raw_path)
        query = urllib.parse.parse_qs(parsed.query)
        record = TokenRequest(
            path=parsed.path,
            query=query,
            authorization=authorization is not None,
            user=None,
            status=0,
        )
        self.requests.append(record)
        json_ct = [("Content-Type", "application/json")]
        if parsed.path != "/token":
            record.status = 404
            return 404, b'{"error":"not found"}', json_ct
        user: str | None = None
        if authorization is not None:
            user = self._check_basic(authorization)
            if user is None:
                record.status = 401
                return (
                    401,
                    b'{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}',
                    [*json_ct, ("WWW-Authenticate", 'Basic realm="token"')],
                )
        if query.get("service", [self.service])[0] != self.service:
            record.status = 400
            return 400, b'{"error":"unknown service"}', json_ct
        access: list[dict[str, Any]] = []
        for scope in query.get("scope", []):
            for one in scope.split(" "):  # some clients join scopes with spaces
                parsed_scope = self._parse_scope(one)
                if parsed_scope is None:
                    continue
                kind, name, actions = parsed_scope
                if user is None:
                    actions = ["pull"] if kind == "repository" and "pull" in actions else []
                if actions:
                    access.append({"type": kind, "name": name, "actions": actions})
        token = self.make_token(access, subject=user or "")
        record.user, record.status, record.granted = user, 200, access
        body = {
            "token": token,
            "access_token": token,
            "expires_in": self.token_ttl,
            "issued_at": utc_now().strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        return 200, json.dumps(body).encode(), json_ct
