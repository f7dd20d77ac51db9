"""Shared fixtures: real loopback servers (see tests/servers/) and an
environment isolated from the developer's home, proxies and EXEC_SANDBOX_* knobs."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from servers import (
    REGISTRY_BINARY,
    FaultProxy,
    HasHost,
    RegistryServer,
    StaticServer,
)
from sigstore_instance import SigstoreInstance

_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")

TOKEN_USERS = {"pusher": "s3cret"}
HTPASSWD_USERS = {"alice": "wonderland"}


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Strip settings that would make tests depend on the machine, and point the
    XDG dirs at a temp dir so nothing is written to the real home.

    Returns the XDG_CACHE_HOME used by this test. EXEC_SANDBOX_CACHE_DIR stays
    unset on purpose: the default cache location (under XDG_CACHE_HOME) is what
    gets exercised. A separate temp dir keeps ``tmp_path`` empty for the test.
    """
    for name in list(os.environ):
        if name.startswith("EXEC_SANDBOX_"):
            monkeypatch.delenv(name, raising=False)
    for name in _PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    base = tmp_path_factory.mktemp("xdg")
    for var in ("XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME"):
        path = base / var.removeprefix("XDG_").removesuffix("_HOME").lower()
        path.mkdir()
        monkeypatch.setenv(var, str(path))
    return base / "cache"


def _require_registry() -> None:
    # No skip: a missing registry must be loud in CI, not silently green.
    if shutil.which(REGISTRY_BINARY) is None:
        pytest.fail(
            f"{REGISTRY_BINARY!r} is not installed; end-to-end tests need CNCF distribution "
            "(Debian: apt-get install -y docker-registry)",
            pytrace=False,
        )


@pytest.fixture
def repo_name(request: pytest.FixtureRequest) -> str:
    """A repository name unique to this test, valid for OCI (lowercase, [a-z0-9._-/])."""
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:80]
    return f"test/{name or 'repo'}"


def _run(server: RegistryServer) -> Iterator[RegistryServer]:
    _require_registry()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[RegistryServer]:
    """Plain HTTP registry, no auth; stop()/start() keeps port and data."""
    yield from _run(RegistryServer(tmp_path / "registry"))


@pytest.fixture
def token_registry(tmp_path: Path) -> Iterator[RegistryServer]:
    """Registry with Docker token auth (ghcr.io-like); ``.token_server`` is the
    TokenServer (anonymous = pull only; user ``pusher``/``s3cret`` = anything)."""
    yield from _run(
        RegistryServer(tmp_path / "token-registry", auth="token", users=dict(TOKEN_USERS))
    )


@pytest.fixture
def htpasswd_registry(tmp_path: Path) -> Iterator[RegistryServer]:
    """Registry with HTTP Basic auth; user ``alice``/``wonderland``."""
    yield from _run(
        RegistryServer(tmp_path / "htpasswd-registry", auth="htpasswd", users=dict(HTPASSWD_USERS))
    )


@pytest.fixture
def tls_registry(tmp_path: Path) -> Iterator[RegistryServer]:
    """HTTPS registry with a test CA: ``.ca_bundle`` (PEM), ``.ssl_context()``."""
    yield from _run(RegistryServer(tmp_path / "tls-registry", tls=True))


@pytest.fixture
def static_server(tmp_path: Path) -> Iterator[StaticServer]:
    """Static HTTP server with Range support serving ``.root`` (a fresh dir)."""
    root = tmp_path / "static-root"
    root.mkdir()
    with StaticServer(root) as server:
        yield server


@pytest.fixture
def static_redirector(static_server: StaticServer) -> Iterator[StaticServer]:
    """Second server answering 302 to the same path on ``static_server``."""
    with StaticServer(redirect_to=static_server) as server:
        yield server


FaultProxyFactory = Callable[[str | HasHost], FaultProxy]


@pytest.fixture
def fault_proxy() -> Iterator[FaultProxyFactory]:
    """Factory: ``fault_proxy(registry)`` or ``fault_proxy("127.0.0.1:PORT")``
    returns a started FaultProxy, closed at teardown."""
    proxies: list[FaultProxy] = []

    def make(upstream: str | HasHost) -> FaultProxy:
        proxy = FaultProxy(upstream).start()
        proxies.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for proxy in proxies:
            proxy.close()


@pytest.fixture
def no_docker_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty DOCKER_CONFIG dir, so no credentials of the machine leak in (isolated_env
    only unsets it, which leaves ~/.docker/config.json readable)."""
    path = tmp_path / "docker-config"
    path.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(path))
    return path


@pytest.fixture(scope="session")
def sigstore_test_instance() -> SigstoreInstance:
    """A private Sigstore instance (CA, CT log, Rekor): see tests/sigstore_instance.py."""
    return SigstoreInstance.create()


@pytest.fixture
def sigstore_root(sigstore_test_instance: SigstoreInstance, tmp_path: Path) -> Path:
    """That instance's trusted_root.json, written for this test."""
    return sigstore_test_instance.write_root(tmp_path / "trusted_root.json")
