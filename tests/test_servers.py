"""The test infrastructure does what it claims (plain httpx against real servers)."""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import HTPASSWD_USERS, TOKEN_USERS, FaultProxyFactory
from servers import FaultProxy, RegistryServer, StaticServer, TokenServer

BLOB = bytes(range(256)) * 64  # 16 KiB, every byte value at known offsets


def _client(**kwargs: object) -> httpx.Client:
    return httpx.Client(trust_env=False, timeout=10, **kwargs)  # type: ignore[arg-type]


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _push_blob(
    client: httpx.Client, base: str, repo: str, data: bytes, *, chunked: bool = False
) -> str:
    digest = _digest(data)
    r = client.post(f"{base}/v2/{repo}/blobs/uploads/")
    assert r.status_code == 202, r.text
    url = httpx.URL(base).join(r.headers["Location"])
    if chunked:
        # An iterator body makes httpx send Transfer-Encoding: chunked.
        r = client.patch(url, content=iter([data[:1000], data[1000:]]))
        assert r.status_code == 202, r.text
        url = httpx.URL(base).join(r.headers["Location"])
        r = client.put(url.copy_add_param("digest", digest))
    else:
        r = client.put(url.copy_add_param("digest", digest), content=data)
    assert r.status_code == 201, r.text
    return digest


def _bearer_params(www_authenticate: str) -> dict[str, str]:
    scheme, _, rest = www_authenticate.partition(" ")
    assert scheme == "Bearer"
    return dict(re.findall(r'(\w+)="([^"]*)"', rest))


def _token(
    client: httpx.Client,
    challenge: str,
    scope: str | None = None,
    auth: tuple[str, str] | None = None,
) -> str:
    params = _bearer_params(challenge)
    query = {"service": params["service"]}
    if scope or "scope" in params:
        query["scope"] = scope or params["scope"]
    r = client.get(params["realm"], params=query, auth=auth)
    assert r.status_code == 200, r.text
    token = r.json()["token"]
    assert isinstance(token, str)
    return token


# -- registry ---------------------------------------------------------------


def test_plain_registry_blob_range_and_restart(registry: RegistryServer, repo_name: str) -> None:
    assert registry.pid is not None and registry.process is not None
    assert os.readlink(f"/proc/{registry.pid}/exe").endswith("docker-registry")
    with _client() as c:
        assert c.get(f"{registry.url}/v2/").status_code == 200
        digest = _push_blob(c, registry.url, repo_name, BLOB)
        r = c.get(f"{registry.url}/v2/{repo_name}/blobs/{digest}", headers={"Range": "bytes=10-19"})
        assert r.status_code == 206
        assert r.headers["Content-Range"] == f"bytes 10-19/{len(BLOB)}"
        assert r.content == BLOB[10:20]

    port, old_pid = registry.port, registry.pid
    registry.stop()
    assert registry.pid is None
    registry.start()
    assert registry.port == port and registry.pid != old_pid
    with _client() as c:
        r = c.get(f"{registry.url}/v2/{repo_name}/blobs/{digest}")
        assert r.status_code == 200 and r.content == BLOB
    assert registry.ref(repo_name) == f"http://127.0.0.1:{port}/{repo_name}"
    assert registry.data_dir.is_dir() and "response completed" in registry.log_text()


def test_token_registry_flow(token_registry: RegistryServer, repo_name: str) -> None:
    ts = token_registry.token_server
    assert isinstance(ts, TokenServer)
    with _client() as c:
        r = c.get(f"{token_registry.url}/v2/")
        assert r.status_code == 401
        challenge = r.headers["WWW-Authenticate"]
        assert challenge.startswith(f'Bearer realm="{ts.realm}"')
        token = _token(c, challenge)
        r = c.get(f"{token_registry.url}/v2/", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200

        # Anonymous tokens carry pull only: a push is refused.
        upload = f"{token_registry.url}/v2/{repo_name}/blobs/uploads/"
        r = c.post(upload)
        assert r.status_code == 401
        push_challenge = r.headers["WWW-Authenticate"]
        # distribution lists the actions in random (Go map) order.
        scope = _bearer_params(push_challenge)["scope"]
        assert scope.startswith(f"repository:{repo_name}:")
        assert set(scope.rpartition(":")[2].split(",")) == {"pull", "push"}
        anon = _token(c, push_challenge)
        assert c.post(upload, headers={"Authorization": f"Bearer {anon}"}).status_code == 401

        # The configured user gets push; wrong credentials are refused.
        user = next(iter(TOKEN_USERS.items()))
        pusher = _token(c, push_challenge, auth=user)
        r = c.post(upload, headers={"Authorization": f"Bearer {pusher}"})
        assert r.status_code == 202
        bad = c.get(ts.realm, params={"service": ts.service}, auth=(user[0], "wrong"))
        assert bad.status_code == 401

    assert [q.status for q in ts.requests] == [200, 200, 200, 401]
    assert [q.authorization for q in ts.requests] == [False, False, True, True]
    assert ts.requests[1].granted == [
        {"type": "repository", "name": repo_name, "actions": ["pull"]}
    ]
    assert sorted(ts.requests[2].granted[0]["actions"]) == ["pull", "push"]


def test_htpasswd_registry(htpasswd_registry: RegistryServer) -> None:
    user, password = next(iter(HTPASSWD_USERS.items()))
    with _client() as c:
        r = c.get(f"{htpasswd_registry.url}/v2/")
        assert r.status_code == 401
        assert r.headers["WWW-Authenticate"].startswith("Basic realm=")
        assert c.get(f"{htpasswd_registry.url}/v2/", auth=(user, "nope")).status_code == 401
        assert c.get(f"{htpasswd_registry.url}/v2/", auth=(user, password)).status_code == 200


def test_tls_registry(tls_registry: RegistryServer) -> None:
    assert tls_registry.url.startswith("https://127.0.0.1:")
    assert tls_registry.ca_bundle.read_text().startswith("-----BEGIN CERTIFICATE-----")
    with _client(verify=tls_registry.ssl_context()) as c:
        assert c.get(f"{tls_registry.url}/v2/").status_code == 200
    with _client() as c, pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        c.get(f"{tls_registry.url}/v2/")


def test_pull_through_cache(registry: RegistryServer, tmp_path: Path, repo_name: str) -> None:
    with _client() as c:
        digest = _push_blob(c, registry.url, repo_name, BLOB)
        with RegistryServer(tmp_path / "cache", proxy_remote=registry.url) as cache:
            r = c.get(f"{cache.url}/v2/{repo_name}/blobs/{digest}")
            assert r.status_code == 200 and r.content == BLOB


# -- static server ----------------------------------------------------------


@pytest.fixture
def release_file(static_server: StaticServer) -> Iterator[str]:
    path = static_server.root / "o" / "r" / "releases" / "download" / "v1" / "blob.bin"
    path.parent.mkdir(parents=True)
    path.write_bytes(BLOB)
    yield "/o/r/releases/download/v1/blob.bin"


def test_static_server_ranges(static_server: StaticServer, release_file: str) -> None:
    url = static_server.url + release_file
    size = len(BLOB)
    with _client() as c:
        r = c.get(url)
        assert r.status_code == 200 and r.content == BLOB
        r = c.get(url, headers={"Range": "bytes=100-"})
        assert r.status_code == 206 and r.content == BLOB[100:]
        assert r.headers["Content-Range"] == f"bytes 100-{size - 1}/{size}"
        r = c.get(url, headers={"Range": "bytes=5-9"})
        assert r.status_code == 206 and r.content == BLOB[5:10]
        r = c.get(url, headers={"Range": f"bytes={size}-"})
        assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{size}"
        r = c.head(url)
        assert r.status_code == 200 and r.headers["Content-Length"] == str(size)
        assert c.get(static_server.url + "/../etc/passwd").status_code == 404
        assert c.get(static_server.url + "/o/r/missing").status_code == 404
    assert static_server.requests[1].headers["range"] == "bytes=100-"


def test_static_redirect(
    static_server: StaticServer, static_redirector: StaticServer, release_file: str
) -> None:
    with _client() as c:
        r = c.get(static_redirector.url + release_file)
        assert r.status_code == 302
        assert r.headers["Location"] == static_server.url + release_file
    with _client(follow_redirects=True) as c:
        r = c.get(static_redirector.url + release_file, headers={"Range": "bytes=1-"})
        assert r.status_code == 206 and r.content == BLOB[1:]
    assert [q.status for q in static_redirector.requests] == [302, 302]
    assert [q.status for q in static_server.requests] == [206]


# -- fault proxy ------------------------------------------------------------


def test_fault_proxy_fail_first(
    fault_proxy: FaultProxyFactory, static_server: StaticServer, release_file: str
) -> None:
    proxy = fault_proxy(static_server)
    proxy.fail_first, proxy.fail_status, proxy.retry_after = 2, 429, "1"
    with _client() as c:
        for _ in range(2):
            r = c.get(proxy.url + release_file)
            assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        assert c.get(proxy.url + release_file).content == BLOB
    assert [q.status for q in proxy.requests] == [429, 429, 200]
    assert [q.answered_by_proxy for q in proxy.requests] == [True, True, False]
    assert len(static_server.requests) == 1  # the failures never reached upstream


def test_fault_proxy_cut_resume_and_range_log(
    fault_proxy: FaultProxyFactory, static_server: StaticServer, release_file: str
) -> None:
    proxy = fault_proxy(static_server)
    proxy.cut_after_bytes, proxy.cut_times = 1000, 1
    got = bytearray()
    with _client() as c:
        with (
            pytest.raises(httpx.RemoteProtocolError),
            c.stream("GET", proxy.url + release_file) as r,
        ):
            assert r.status_code == 200
            for chunk in r.iter_raw():
                got += chunk
        assert bytes(got) == BLOB[:1000]
        r = c.get(proxy.url + release_file, headers={"Range": f"bytes={len(got)}-"})
        assert r.status_code == 206
        got += r.content
    assert bytes(got) == BLOB
    assert proxy.requests[1].headers["range"] == "bytes=1000-"
    assert proxy.connections == 2
    assert proxy.bytes_to_client > len(BLOB)


def test_fault_proxy_flip_stall_throttle(
    fault_proxy: FaultProxyFactory, static_server: StaticServer, release_file: str
) -> None:
    proxy = fault_proxy(static_server)
    proxy.flip_byte_at, proxy.flip_times = 300, 1
    with _client() as c:
        corrupted = c.get(proxy.url + release_file).content
        assert corrupted[300] == BLOB[300] ^ 0xFF
        assert corrupted[:300] == BLOB[:300] and corrupted[301:] == BLOB[301:]
        assert c.get(proxy.url + release_file).content == BLOB

        proxy.reset()
        proxy.stall_seconds, proxy.stall_after_bytes = 0.5, 100
        with pytest.raises(httpx.ReadTimeout):
            c.get(proxy.url + release_file, timeout=0.2)

        proxy.reset()
        proxy.throttle_bytes_per_s = 32 * 1024  # 16 KiB -> ~0.5 s
        t0 = time.monotonic()
        assert c.get(proxy.url + release_file).content == BLOB
        assert time.monotonic() - t0 >= 0.4


def test_fault_proxy_in_front_of_registry(
    fault_proxy: FaultProxyFactory, registry: RegistryServer, repo_name: str
) -> None:
    proxy: FaultProxy = fault_proxy(registry)
    proxy.match_path = "/blobs/sha256:"
    proxy.fail_first, proxy.fail_status = 1, 500
    with _client() as c:
        # Chunked request bodies are parsed and relayed intact.
        digest = _push_blob(c, proxy.url, repo_name, BLOB, chunked=True)
        blob_url = f"{proxy.url}/v2/{repo_name}/blobs/{digest}"
        assert c.get(blob_url).status_code == 500
        assert c.get(blob_url).content == BLOB
        r = c.get(f"{proxy.url}/v2/", headers={"Authorization": "Bearer x"})
        assert r.status_code == 200
    assert [q.status for q in proxy.requests][-3:] == [500, 200, 200]
    assert proxy.requests[-1].headers["authorization"] == "Bearer x"
    assert proxy.ref(repo_name) == f"http://{proxy.host}/{repo_name}"


def test_isolated_env(isolated_env: Path) -> None:
    assert os.environ["XDG_CACHE_HOME"] == str(isolated_env)
    assert not any(k.startswith("EXEC_SANDBOX_") for k in os.environ)
    assert "HTTPS_PROXY" not in os.environ and "https_proxy" not in os.environ
