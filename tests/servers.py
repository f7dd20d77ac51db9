"""Real loopback servers for end-to-end tests (no pytest dependency).

- ``RegistryServer``: CNCF distribution (``docker-registry``) with optional
  htpasswd / token auth, TLS, pull-through-cache mode.
- ``TokenServer``: Docker token-auth endpoint (ES256 JWT), in-process thread.
- ``StaticServer``: directory server with Range support, or a 302 redirector.
- ``FaultProxy``: TCP proxy injecting cuts, stalls, throttling, bit flips and
  local 500/429 answers, with a request log.

Everything binds and connects to 127.0.0.1 only. See /work/shared/TESTING.md.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import http.client
import http.server
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, Self, cast

import bcrypt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK = "127.0.0.1"
REGISTRY_BINARY = "docker-registry"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


class HasHost(Protocol):
    """Anything exposing ``host`` as ``"127.0.0.1:PORT"`` (all servers here do)."""

    @property
    def host(self) -> str: ...


@dataclass
class RequestRecord:
    """One HTTP request seen by a StaticServer or FaultProxy.

    ``headers`` keys are lower-cased (``rec.headers.get("range")``); repeated
    headers are joined with ", ". ``status`` is filled in once the response
    head is seen (None if the connection died first).
    """

    method: str
    path: str
    headers: dict[str, str]
    status: int | None = None
    answered_by_proxy: bool = False
    connection_id: int = 0


def _upstream_host(upstream: str | HasHost) -> tuple[str, int]:
    host = upstream if isinstance(upstream, str) else upstream.host
    host = host.removeprefix("http://")
    name, _, port = host.rpartition(":")
    if name not in (LOOPBACK, "localhost"):
        raise ValueError(f"only loopback upstreams are allowed, got {host!r}")
    return LOOPBACK, int(port)


# --------------------------------------------------------------------------
# Certificates
# --------------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class TlsFiles:
    """A test CA and a server certificate for IP 127.0.0.1 and DNS localhost."""

    ca_bundle: Path
    cert: Path
    key: Path

    @classmethod
    def generate(cls, directory: Path) -> TlsFiles:
        directory.mkdir(parents=True, exist_ok=True)
        start = _now() - dt.timedelta(minutes=5)
        end = start + dt.timedelta(days=2)

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "exec-sandbox test CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
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
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )

        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.IPAddress(ipaddress.IPv4Address(LOOPBACK)),
                        x509.DNSName("localhost"),
                    ]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )

        files = cls(
            ca_bundle=directory / "ca.pem",
            cert=directory / "server.crt",
            key=directory / "server.key",
        )
        files.ca_bundle.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files.key.write_bytes(_pem_key(key))
        return files

    def client_context(self) -> ssl.SSLContext:
        """An SSL context trusting only this test CA."""
        return ssl.create_default_context(cafile=str(self.ca_bundle))


# --------------------------------------------------------------------------
# Threaded stdlib HTTP servers (shared base of TokenServer and StaticServer)
# --------------------------------------------------------------------------


class _TrackingHTTPServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer that remembers open connections so stop() can cut
    keep-alive handlers blocked in recv (shutdown() alone leaves them hanging)."""

    daemon_threads = True
    owner: Any

    def __init__(self, owner: Any, handler: type[http.server.BaseHTTPRequestHandler]) -> None:
        self.owner = owner
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__((LOOPBACK, 0), handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn): skip the lookup.
        socketserver.TCPServer.server_bind(self)
        self.server_name = LOOPBACK
        self.server_port = int(self.socket.getsockname()[1])

    def process_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        if isinstance(request, socket.socket):
            with self._conns_lock:
                self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: socket.socket | tuple[bytes, socket.socket]) -> None:
        if isinstance(request, socket.socket):
            with self._conns_lock:
                self._conns.discard(request)
        super().shutdown_request(request)

    def cut_all(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _ThreadedServerBase:
    """start()/stop()/context-manager lifecycle around a _TrackingHTTPServer."""

    _handler: type[http.server.BaseHTTPRequestHandler]

    def __init__(self) -> None:
        self._httpd: _TrackingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None

    def start(self) -> Self:
        if self._httpd is not None:
            return self
        httpd = _TrackingHTTPServer(self, self._handler)
        self._httpd = httpd
        self._port = int(httpd.server_address[1])
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{type(self).__name__}:{self._port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.cut_all()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    close = stop

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{type(self).__name__} not started")
        return self._port

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"


class _QuietHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like real servers

    def log_message(self, format: str, *args: Any) -> None:
        # Per-request stderr lines only add noise to pytest output; servers keep logs.
        pass

    def _headers_dict(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            out[key] = f"{out[key]}, {value}" if key in out else value
        return out

    def _send_simple(
        self, status: int, body: bytes = b"", headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)


# --------------------------------------------------------------------------
# Token server (Docker token auth, like ghcr.io)
# --------------------------------------------------------------------------


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


class _TokenHandler(_QuietHandler):
    def do_GET(self) -> None:
        owner = cast(TokenServer, cast(_TrackingHTTPServer, self.server).owner)
        status, body, headers = owner._handle(self.path, self.headers.get("Authorization"))
        self._send_simple(status, body, headers)


class TokenServer(_ThreadedServerBase):
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
        start = _now() - dt.timedelta(minutes=5)
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
            "issued_at": _now().strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        return 200, json.dumps(body).encode(), json_ct


# --------------------------------------------------------------------------
# Registry (CNCF distribution 2.8.2)
# --------------------------------------------------------------------------


class RegistryServer:
    """A ``docker-registry serve`` process on 127.0.0.1 with its own data dir.

    ``base_dir`` receives ``config.yml``, ``data/``, ``registry.log`` and any
    generated TLS / htpasswd / token files. ``stop()`` then ``start()`` brings
    the registry back on the same port with the same data. With
    ``auth="token"`` a TokenServer is created (and owned) unless one is given.
    """

    def __init__(
        self,
        base_dir: Path,
        *,
        auth: Literal["htpasswd", "token"] | None = None,
        users: dict[str, str] | None = None,
        tls: bool = False,
        proxy_remote: str | None = None,
        proxy_username: str | None = None,
        proxy_password: str | None = None,
        remote_ca_bundle: Path | None = None,
        token_server: TokenServer | None = None,
        startup_timeout: float = 20.0,
    ) -> None:
        if proxy_remote is not None:
            _upstream_host(urllib.parse.urlsplit(proxy_remote).netloc)  # loopback only
        self.base_dir = base_dir
        self.auth = auth
        self.users: dict[str, str] = dict(users or {})
        self.tls = tls
        self.proxy_remote = proxy_remote
        self.proxy_username = proxy_username
        self.proxy_password = proxy_password
        self.remote_ca_bundle = remote_ca_bundle
        self.startup_timeout = startup_timeout
        self.token_server = token_server
        self._owns_token_server = False
        self.tls_files: TlsFiles | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._port: int | None = None

    # -- paths and addresses ----------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def config_path(self) -> Path:
        return self.base_dir / "config.yml"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "registry.log"

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("RegistryServer not started")
        return self._port

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    def ref(self, repo: str) -> str:
        return f"{self.url}/{repo}"

    @property
    def ca_bundle(self) -> Path:
        if self.tls_files is None:
            raise RuntimeError("ca_bundle exists only with tls=True (after start())")
        return self.tls_files.ca_bundle

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def ssl_context(self) -> ssl.SSLContext:
        """Client SSL context trusting this registry's test CA."""
        if self.tls_files is None:
            raise RuntimeError("ssl_context exists only with tls=True (after start())")
        return self.tls_files.client_context()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- lifecycle ----------------------------------------------------------

    def _prepare(self) -> None:
        """One-time setup: dirs, TLS material, htpasswd, token server."""
        if shutil.which(REGISTRY_BINARY) is None:
            raise FileNotFoundError(
                f"{REGISTRY_BINARY!r} not found on PATH: install CNCF distribution "
                "(Debian: apt-get install -y docker-registry)"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.tls and self.tls_files is None:
            self.tls_files = TlsFiles.generate(self.base_dir / "tls")
        if self.auth == "htpasswd":
            lines = [
                f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
                for u, p in self.users.items()
            ]
            (self.base_dir / "htpasswd").write_text("".join(lines))
        if self.auth == "token" and self.token_server is None:
            self.token_server = TokenServer(self.base_dir / "token", self.users)
            self._owns_token_server = True
        if self.token_server is not None and self._owns_token_server:
            self.token_server.start()

    def _config(self, port: int) -> dict[str, Any]:
        http_cfg: dict[str, Any] = {
            "addr": f"{LOOPBACK}:{port}",
            # A fixed secret keeps upload state valid across stop()/start().
            "secret": "exec-sandbox-test-secret",
        }
        if self.tls_files is not None:
            http_cfg["tls"] = {
                "certificate": str(self.tls_files.cert),
                "key": str(self.tls_files.key),
            }
        cfg: dict[str, Any] = {
            "version": "0.1",
            "log": {"level": "info", "formatter": "text"},
            "storage": {
                "filesystem": {"rootdirectory": str(self.data_dir)},
                "delete": {"enabled": True},
                # No background purge racing tests that inspect upload dirs.
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": http_cfg,
        }
        if self.auth == "htpasswd":
            cfg["auth"] = {
                "htpasswd": {"realm": "exec-sandbox-test", "path": str(self.base_dir / "htpasswd")}
            }
        elif self.auth == "token":
            assert self.token_server is not None
            cfg["auth"] = {
                "token": {
                    "realm": self.token_server.realm,
                    "service": self.token_server.service,
                    "issuer": self.token_server.issuer,
                    "rootcertbundle": str(self.token_server.cert_bundle),
                }
            }
        elif self.auth is not None:
            raise ValueError(f"unknown auth {self.auth!r}")
        if self.proxy_remote is not None:
            proxy: dict[str, str] = {"remoteurl": self.proxy_remote}
            if self.proxy_username is not None:
                proxy["username"] = self.proxy_username
                proxy["password"] = self.proxy_password or ""
            cfg["proxy"] = proxy
        return cfg

    def start(self) -> Self:
        """Start (or restart on the same port and data) and wait until ready."""
        if self.process is not None and self.process.poll() is None:
            return self
        first = self._port is None
        if first:
            self._prepare()
        # A port picked by free_port() can be taken by a concurrent test run
        # before the registry binds it: on a first start, retry with another.
        attempts = 5 if first else 1
        for attempt in range(attempts):
            port = free_port() if first else self.port
            try:
                self._spawn(port)
                return self
            except _PortInUse:
                if attempt == attempts - 1:
                    raise RuntimeError(
                        f"registry could not bind a port:\n{self.log_text()}"
                    ) from None
        return self  # unreachable; keeps mypy happy about the return path

    def _spawn(self, port: int) -> None:
        # JSON is YAML: no PyYAML needed to write the config.
        self.config_path.write_text(json.dumps(self._config(port), indent=2))
        # Minimal environment: no HTTP(S)_PROXY / REGISTRY_* leaking in, so the
        # pull-through cache only ever talks to the loopback remote.
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.base_dir)}
        if self.remote_ca_bundle is not None:
            env["SSL_CERT_FILE"] = str(self.remote_ca_bundle)
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            # Popen on the binary itself: .pid is the registry, not a shell.
            self.process = subprocess.Popen(
                [REGISTRY_BINARY, "serve", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.base_dir,
            )
        self._port = port
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.process.poll() is not None:
                new_log = self.log_text()[log_offset:]
                self.process = None
                if "address already in use" in new_log:
                    raise _PortInUse
                raise RuntimeError(
                    f"docker-registry exited during startup; log {self.log_path}:\n{new_log}"
                )
            status = self._probe()
            if status in (200, 401):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"docker-registry not ready after {self.startup_timeout}s "
                    f"(last /v2/ status {status}); log:\n{self.log_text()[log_offset:]}"
                )
            time.sleep(0.02)

    def _probe(self) -> int | None:
        conn: http.client.HTTPConnection
        if self.tls_files is not None:
            conn = http.client.HTTPSConnection(
                LOOPBACK, self.port, timeout=2, context=self.tls_files.client_context()
            )
        else:
            conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=2)
        try:
            conn.request("GET", "/v2/")
            return conn.getresponse().status
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait, SIGKILL fallback. The owned token server keeps running
        so a later start() works; close() stops everything."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL (crash), no grace period."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    def close(self) -> None:
        self.stop()
        if self._owns_token_server and self.token_server is not None:
            self.token_server.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class RedirectingRegistry(RegistryServer):
    """distribution with its `redirect` storage middleware: blob GETs answer 307 to
    `cdn_url` + the blob's storage path, as registries backed by S3/GCS do."""

    def __init__(self, base_dir: Path, cdn_url: str, **kwargs: Any) -> None:
        super().__init__(base_dir, **kwargs)
        self.cdn_url = cdn_url

    def _config(self, port: int) -> dict[str, Any]:
        cfg = super()._config(port)
        cfg["middleware"] = {
            "storage": [{"name": "redirect", "options": {"baseurl": self.cdn_url}}]
        }
        return cfg


class _PortInUse(Exception):
    pass


# --------------------------------------------------------------------------
# Static file server (GitHub Releases stand-in)
# --------------------------------------------------------------------------

_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")


class _StaticHandler(_QuietHandler):
    def _owner(self) -> StaticServer:
        return cast(StaticServer, cast(_TrackingHTTPServer, self.server).owner)

    def do_HEAD(self) -> None:
        self._serve()

    def do_GET(self) -> None:
        self._serve()

    def _serve(self) -> None:
        owner = self._owner()
        record = RequestRecord(self.command, self.path, self._headers_dict())
        owner.requests.append(record)
        if owner.redirect_to is not None:
            record.status = 302
            self._send_simple(302, headers=[("Location", owner.redirect_to.url + self.path)])
            return
        target = owner._resolve(self.path)
        if target is None:
            record.status = 404
            self._send_simple(404, b"not found\n", [("Content-Type", "text/plain")])
            return
        size = target.stat().st_size
        start, end, status = 0, size - 1, 200
        range_header = self.headers.get("Range")
        if range_header is not None:
            parsed = _parse_range(range_header, size)
            if parsed == "unsatisfiable":
                record.status = 416
                self._send_simple(416, headers=[("Content-Range", f"bytes */{size}")])
                return
            if parsed is not None:
                start, end = parsed
                status = 206
        record.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(max(end - start + 1, 0)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if self.command == "HEAD":
            return
        with target.open("rb") as f:
            f.seek(start)
            remaining = end - start + 1
            while remaining > 0:
                chunk = f.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)


def _parse_range(value: str, size: int) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """(start, end) inclusive; None = ignore the header (serve 200)."""
    m = _RANGE_RE.fullmatch(value.strip())
    if m is None or (m[1] == "" and m[2] == ""):
        return None
    if m[1] == "":  # suffix range: last N bytes
        n = int(m[2])
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(size - n, 0), size - 1
    start = int(m[1])
    end = int(m[2]) if m[2] else size - 1
    if start >= size or end < start:
        return "unsatisfiable"
    return start, min(end, size - 1)


class StaticServer(_ThreadedServerBase):
    """Serves files under ``root`` over HTTP/1.1 with Range and HEAD support.

    With ``redirect_to`` it serves nothing itself and answers every GET/HEAD
    with 302 to the same path on the other server (GitHub -> CDN). ``requests``
    logs every request (method, path, lower-cased headers, status).
    """

    _handler = _StaticHandler

    def __init__(
        self, root: Path | None = None, *, redirect_to: StaticServer | None = None
    ) -> None:
        super().__init__()
        if (root is None) == (redirect_to is None):
            raise ValueError("give exactly one of root or redirect_to")
        self._root = root.resolve() if root is not None else None
        self.redirect_to = redirect_to
        self.requests: list[RequestRecord] = []

    @property
    def root(self) -> Path:
        if self._root is None:
            raise RuntimeError("a redirecting StaticServer has no root")
        return self._root

    def url_for(self, path: str) -> str:
        return f"{self.url}/{path.lstrip('/')}"

    def _resolve(self, raw_path: str) -> Path | None:
        rel = urllib.parse.unquote(urllib.parse.urlsplit(raw_path).path).lstrip("/")
        target = (self.root / rel).resolve()
        if not target.is_relative_to(self.root) or not target.is_file():
            return None
        return target


# --------------------------------------------------------------------------
# Fault-injecting TCP proxy
# --------------------------------------------------------------------------

_REASONS = {
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}
_ERROR_CODES = {429: "TOOMANYREQUESTS", 503: "UNAVAILABLE"}


class _ClientReader:
    """Buffered reads from the client socket; EOF/errors surface as _Eof."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> None:
        try:
            data = self.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            raise _Eof
        self.buf += data

    def read_head(self, limit: int = 1 << 16) -> bytes:
        while True:
            # Tolerate stray CRLFs between requests (RFC 9112 section 2.2).
            while self.buf[:2] == b"\r\n":
                del self.buf[:2]
            idx = self.buf.find(b"\r\n\r\n")
            if idx >= 0:
                head = bytes(self.buf[: idx + 4])
                del self.buf[: idx + 4]
                return head
            if len(self.buf) > limit:
                raise _Eof
            self._fill()

    def read_line(self) -> bytes:
        while (idx := self.buf.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self.buf[: idx + 2])
        del self.buf[: idx + 2]
        return line

    def read_some(self, n: int) -> bytes:
        if not self.buf:
            self._fill()
        chunk = bytes(self.buf[:n])
        del self.buf[:n]
        return chunk


class _Eof(Exception):
    pass


def _parse_request_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    method, path = (parts[0], parts[1]) if len(parts) >= 2 else (parts[0], "")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        key, value = name.strip().lower(), value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return method, path, headers


@dataclass
class _Plan:
    """Faults snapshotted for one forwarded request's response."""

    cut_after: int | None = None
    flip_at: int | None = None
    stall_seconds: float = 0.0
    stall_after: int | None = None
    throttle: int | None = None


@dataclass
class _Response:
    record: RequestRecord
    plan: _Plan
    pos: int = 0  # bytes of this response relayed (or consumed) so far
    head_buf: bytearray = field(default_factory=bytearray)
    body_start: int | None = None  # offset of the body in the response stream
    stalled: bool = False
    throttle_t0: float = 0.0
    throttle_sent: int = 0


class _Connection:
    def __init__(self, proxy: FaultProxy, client: socket.socket, conn_id: int) -> None:
        self.proxy = proxy
        self.client = client
        self.id = conn_id
        self.upstream: socket.socket | None = None
        self.upstream_thread: threading.Thread | None = None
        self.response: _Response | None = None
        self.write_lock = threading.Lock()
        self.closed = threading.Event()

    # -- shared -------------------------------------------------------------

    def close(self) -> None:
        self.closed.set()
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def _to_client(self, data: bytes | bytearray) -> None:
        if not data:
            return
        with self.write_lock:
            self.client.sendall(data)
        self.proxy._count_to_client(len(data))

    # -- client -> upstream -------------------------------------------------

    def serve(self) -> None:
        reader = _ClientReader(self.client)
        try:
            while not self.closed.is_set():
                head = reader.read_head()
                method, path, headers = _parse_request_head(head)
                record = RequestRecord(method, path, headers, connection_id=self.id)
                self.proxy._log(record)
                fail, plan = self.proxy._plan(path)
                if fail is not None:
                    self._drain_body(reader, headers, None)
                    self._answer_locally(record, *fail)
                    if headers.get("connection", "").lower() == "close":
                        return
                    continue
                if self.upstream is None and not self._connect_upstream(record):
                    return
                assert self.upstream is not None
                # Installed before forwarding so every byte of the answer is
                # attributed to this request (clients do not pipeline).
                self.response = _Response(record, plan)
                self.upstream.sendall(head)
                self._drain_body(reader, headers, self.upstream)
        except (_Eof, OSError):
            pass
        finally:
            self.close()
            if self.upstream_thread is not None:
                self.upstream_thread.join(timeout=5)

    def _drain_body(
        self, reader: _ClientReader, headers: dict[str, str], sink: socket.socket | None
    ) -> None:
        def forward(data: bytes) -> None:
            if sink is not None:
                sink.sendall(data)

        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                line = reader.read_line()
                forward(line)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while (trailer := reader.read_line()) != b"\r\n":
                        forward(trailer)
                    forward(b"\r\n")
                    return
                remaining = size + 2  # chunk data + CRLF
                while remaining:
                    data = reader.read_some(remaining)
                    forward(data)
                    remaining -= len(data)
        remaining = int(headers.get("content-length", "0") or "0")
        while remaining > 0:
            data = reader.read_some(min(remaining, 1 << 16))
            forward(data)
            remaining -= len(data)

    def _answer_locally(self, record: RequestRecord, status: int, retry_after: str | None) -> None:
        code = _ERROR_CODES.get(status, "UNKNOWN")
        body = json.dumps(
            {"errors": [{"code": code, "message": f"injected by FaultProxy ({status})"}]}
        ).encode()
        lines = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
        ]
        if retry_after is not None:
            lines.append(f"Retry-After: {retry_after}")
        payload = ("\r\n".join(lines) + "\r\n\r\n").encode()
        if record.method != "HEAD":
            payload += body
        record.status = status
        record.answered_by_proxy = True
        self._to_client(payload)

    def _connect_upstream(self, record: RequestRecord) -> bool:
        try:
            self.upstream = socket.create_connection(self.proxy.upstream_addr, timeout=10)
            self.upstream.settimeout(None)
        except OSError:
            # What a reverse proxy in front of a dead registry answers.
            self._answer_locally(record, 502, None)
            return False
        self.upstream_thread = threading.Thread(
            target=self._pump_upstream, name=f"FaultProxy-up-{self.id}", daemon=True
        )
        self.upstream_thread.start()
        return True

    # -- upstream -> client -------------------------------------------------

    def _pump_upstream(self) -> None:
        assert self.upstream is not None
        try:
            while not self.closed.is_set():
                data = self.upstream.recv(65536)
                if not data:
                    break
                resp = self.response
                if resp is None:
                    self._to_client(data)
                elif not self._relay(resp, data):
                    break  # cut
        except OSError:
            pass
        finally:
            self.close()

    def _relay(self, resp: _Response, data: bytes) -> bool:
        """Relay one upstream chunk applying the response's faults; False = cut."""
        proxy = self.proxy
        out = bytearray(data)
        p0 = resp.pos
        resp.pos += len(data)
        if resp.body_start is None:
            resp.head_buf += data
            idx = resp.head_buf.find(b"\r\n\r\n")
            if idx >= 0:
                resp.body_start = idx + 4
                status_line = bytes(resp.head_buf[: resp.head_buf.find(b"\r\n")])
                with contextlib.suppress(IndexError, ValueError):
                    resp.record.status = int(status_line.split(b" ")[1])
                resp.head_buf = bytearray()
        plan = resp.plan
        bs = resp.body_start
        # Offsets below are body offsets: index in `out` = body_start + offset - p0.
        if bs is not None and plan.flip_at is not None:
            i = bs + plan.flip_at - p0
            if 0 <= i < len(out) and proxy._take("flip"):
                out[i] ^= 0xFF
        cut = False
        if bs is not None and plan.cut_after is not None:
            i = bs + plan.cut_after - p0
            # Cut only when a byte beyond the limit exists: a body that fits is untouched.
            if 0 <= i < len(out) and proxy._take("cut"):
                del out[i:]
                cut = True
        stall_at: int | None = None
        if plan.stall_seconds > 0 and not resp.stalled:
            if plan.stall_after is None:
                stall_at = 0 if p0 == 0 else None
            elif bs is not None:
                i = bs + plan.stall_after - p0
                stall_at = i if 0 <= i < len(data) else None
            if stall_at is not None and not proxy._take("stall"):
                stall_at = None
        if stall_at is not None:
            resp.stalled = True
            self._send_throttled(resp, out[:stall_at])
            proxy._closing.wait(plan.stall_seconds)
            self._send_throttled(resp, out[stall_at:])
        else:
            self._send_throttled(resp, out)
        return not cut

    def _send_throttled(self, resp: _Response, data: bytearray) -> None:
        rate = resp.plan.throttle
        if not rate:
            self._to_client(data)
            return
        if resp.throttle_sent == 0:
            resp.throttle_t0 = time.monotonic()
        step = max(1, min(65536, rate // 20))
        view = memoryview(data)
        for off in range(0, len(view), step):
            piece = view[off : off + step]
            self._to_client(piece.tobytes())
            resp.throttle_sent += len(piece)
            delay = resp.throttle_t0 + resp.throttle_sent / rate - time.monotonic()
            if delay > 0 and self.proxy._closing.wait(delay):
                return


class FaultProxy:
    """Loopback TCP proxy in front of a plain-HTTP server, injecting faults.

    Set attributes at any time between requests; they apply to requests whose
    head arrives afterwards, and only to requests whose path contains
    ``match_path`` (when set):

    - ``fail_first`` (+ ``fail_status``, ``retry_after``): answer the next K
      requests locally with that status, no upstream contact;
    - ``cut_after_bytes``: close the connection after that many **body** bytes
      of a response were relayed (only if the body is longer), at most
      ``cut_times`` times (None = every time);
    - ``flip_byte_at``: invert the body byte at that offset, at most
      ``flip_times`` times (None = every time);
    - ``stall_seconds``: go silent that long before the response's first byte,
      or before body offset ``stall_after_bytes`` when set; at most
      ``stall_times`` times (None = every time);
    - ``throttle_bytes_per_s``: cap each response's relay rate.

    Body offsets are counted after the response header block, so a test knows
    how many bytes of a blob the client got. ``requests`` logs every request;
    ``bytes_to_client`` counts every byte sent to clients. TLS passes through
    as opaque bytes and cannot be parsed: put the proxy in front of plain HTTP.
    """

    def __init__(self, upstream: str | HasHost) -> None:
        self.upstream_addr = _upstream_host(upstream)
        self.requests: list[RequestRecord] = []
        self.bytes_to_client = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._conns: set[_Connection] = set()
        self._threads: list[threading.Thread] = []
        self._port: int | None = None
        self._reset_faults()

    def _reset_faults(self) -> None:
        self.match_path: str | None = None
        self.fail_first = 0
        self.fail_status = 500
        self.retry_after: str | None = None
        self.cut_after_bytes: int | None = None
        self.cut_times: int | None = None
        self.flip_byte_at: int | None = None
        self.flip_times: int | None = None
        self.stall_seconds = 0.0
        self.stall_after_bytes: int | None = None
        self.stall_times: int | None = None
        self.throttle_bytes_per_s: int | None = None

    def reset(self) -> None:
        """Clear every fault, the request log and the counters."""
        with self._lock:
            self._reset_faults()
            self.requests.clear()
            self.bytes_to_client = 0
            self.connections = 0

    # -- addresses ------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FaultProxy not started")
        return self._port

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def ref(self, repo: str) -> str:
        return f"{self.url}/{repo}"

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> Self:
        if self._listener is not None:
            return self
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, 0))
        listener.listen(128)
        # Timeout so the accept loop notices close() (closing does not wake accept()).
        listener.settimeout(0.1)
        self._listener = listener
        self._port = int(listener.getsockname()[1])
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"FaultProxy:{self._port}", daemon=True
        )
        self._accept_thread.start()
        return self

    def close(self) -> None:
        self._closing.set()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
            threads = list(self._threads)
        for conn in conns:
            conn.close()
        for t in threads:
            t.join(timeout=5)

    stop = close

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.connections += 1
                conn = _Connection(self, client, self.connections)
                self._conns.add(conn)
                t = threading.Thread(
                    target=self._run_conn,
                    args=(conn,),
                    name=f"FaultProxy-c{conn.id}",
                    daemon=True,
                )
                self._threads = [x for x in self._threads if x.is_alive()]
                self._threads.append(t)
            t.start()

    def _run_conn(self, conn: _Connection) -> None:
        try:
            conn.serve()
        finally:
            with self._lock:
                self._conns.discard(conn)

    # -- used by connections --------------------------------------------------

    def _log(self, record: RequestRecord) -> None:
        with self._lock:
            self.requests.append(record)

    def _count_to_client(self, n: int) -> None:
        with self._lock:
            self.bytes_to_client += n

    def _plan(self, path: str) -> tuple[tuple[int, str | None] | None, _Plan]:
        """Decide the fate of a request: (local failure or None, response faults)."""
        with self._lock:
            if self.match_path is not None and self.match_path not in path:
                return None, _Plan()
            if self.fail_first > 0:
                self.fail_first -= 1
                return (self.fail_status, self.retry_after), _Plan()
            return None, _Plan(
                cut_after=self.cut_after_bytes,
                flip_at=self.flip_byte_at,
                stall_seconds=self.stall_seconds,
                stall_after=self.stall_after_bytes,
                throttle=self.throttle_bytes_per_s,
            )

    def _take(self, kind: Literal["cut", "flip", "stall"]) -> bool:
        """Consume one use of a fault's budget; False when it is used up."""
        attr = f"{kind}_times"
        with self._lock:
            left: int | None = getattr(self, attr)
            if left is None:
                return True
            if left <= 0:
                return False
            setattr(self, attr, left - 1)
            return True
