"""CNCF distribution (``docker-registry serve``) processes: plain, TLS, htpasswd or
token auth, pull-through cache, and blob redirects to a CDN."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.parse
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import bcrypt

from servers.common import LOOPBACK, free_port, loopback_upstream
from servers.tls import TlsFiles
from servers.token import TokenServer

REGISTRY_BINARY = "docker-registry"


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
            loopback_upstream(urllib.parse.urlsplit(proxy_remote).netloc)  # loopback only
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
