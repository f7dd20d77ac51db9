"""RegistryClient, RegistryAuth and reference parsing.

Transports are tested against real CNCF distribution 2.8.2 processes (tests/servers/);
the only hand-written HTTP server (servers.HostileCdn) plays a hostile blob CDN, which no
registry is.
Faults (429, 5xx, cut bodies, flipped bytes) come from the FaultProxy between the
client and a real registry. Only 127.0.0.1/localhost are contacted.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import HTPASSWD_USERS, TOKEN_USERS, FaultProxyFactory
from exec_sandbox_assets.base.errors import (
    AssetChecksumError,
    AssetDownloadError,
    AssetNotFoundError,
    AuthError,
    ConfigError,
    SizeLimitError,
)
from exec_sandbox_assets.oci.auth import (
    Credentials,
    RegistryAuth,
    load_docker_credentials,
    parse_www_authenticate,
)
from exec_sandbox_assets.oci.http import HttpCore
from exec_sandbox_assets.oci.model import (
    EMPTY_DESCRIPTOR,
    EMPTY_JSON,
    MEDIA_TYPE_MANIFEST,
    Descriptor,
    Manifest,
)
from exec_sandbox_assets.oci.reference import (
    LayoutRef,
    RegistryRef,
    parse_registry_ref,
    parse_source_ref,
)
from exec_sandbox_assets.oci.registry import RegistryClient, RetryPolicy
from servers import LOOPBACK, HostileCdn, RedirectingRegistry, RegistryServer, StaticServer

FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05)
BLOB = os.urandom(3 * 1024 * 1024 + 12345)  # several 1 MiB chunks plus a tail
LAYER_TYPE = "application/vnd.exec-sandbox.kernel.v1+zstd"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------
# Pushing test content with plain httpx (the pull client has no push side)
# --------------------------------------------------------------------------


def _push_blob(client: httpx.Client, base: str, repo: str, data: bytes) -> str:
    digest = sha256(data)
    r = client.post(f"{base}/v2/{repo}/blobs/uploads/")
    assert r.status_code == 202, r.text
    url = httpx.URL(base).join(r.headers["Location"]).copy_add_param("digest", digest)
    r = client.put(url, content=data, headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    return digest


def _push_manifest(client: httpx.Client, base: str, repo: str, ref: str, body: bytes) -> None:
    r = client.put(
        f"{base}/v2/{repo}/manifests/{ref}",
        content=body,
        headers={"Content-Type": MEDIA_TYPE_MANIFEST},
    )
    assert r.status_code == 201, r.text


def _pusher(server: RegistryServer, repo: str) -> httpx.Client:
    headers: dict[str, str] = {}
    auth: tuple[str, str] | None = None
    if server.auth == "htpasswd":
        auth = next(iter(HTPASSWD_USERS.items()))
    elif server.auth == "token":
        assert server.token_server is not None
        access = [{"type": "repository", "name": repo, "actions": ["pull", "push"]}]
        headers["Authorization"] = "Bearer " + server.token_server.make_token(access, "pusher")
    verify: Any = server.ssl_context() if server.tls else True
    return httpx.Client(trust_env=False, timeout=30, auth=auth, headers=headers, verify=verify)


def push_artifact(server: RegistryServer, repo: str, tag: str = "v1") -> tuple[bytes, str]:
    """Push one manifest (empty config, one layer = BLOB) under `tag`; (bytes, digest)."""
    with _pusher(server, repo) as client:
        _push_blob(client, server.url, repo, EMPTY_JSON)
        _push_blob(client, server.url, repo, BLOB)
        manifest = Manifest(
            config=EMPTY_DESCRIPTOR,
            layers=(
                Descriptor.for_bytes(
                    LAYER_TYPE, BLOB, {"org.opencontainers.image.title": "vmlinuz-x86_64.zst"}
                ),
            ),
            artifact_type="application/vnd.exec-sandbox.assets.v1",
        ).to_bytes()
        _push_manifest(client, server.url, repo, tag, manifest)
    return manifest, sha256(manifest)


def ref_of(server: RegistryServer | Any, repo: str) -> RegistryRef:
    return parse_registry_ref(f"{server.url}/{repo}")


async def read_stream(client: RegistryClient, digest: str, offset: int = 0) -> tuple[int, bytes]:
    async with client.open_blob(digest, offset) as stream:
        return stream.offset, b"".join([c async for c in stream.chunks()])


# --------------------------------------------------------------------------
# References (pure)
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "ghcr.io/dualeai/exec-sandbox-assets",
            RegistryRef("https", "ghcr.io", "dualeai/exec-sandbox-assets"),
        ),
        ("host:5000/a/b:tag", RegistryRef("https", "host:5000", "a/b", "tag")),
        (
            "host.example/repo@sha256:" + "a" * 64,
            RegistryRef("https", "host.example", "repo", None, "sha256:" + "a" * 64),
        ),
        (
            "docker://host.example/repo:v1.2_3-x",
            RegistryRef("https", "host.example", "repo", "v1.2_3-x"),
        ),
        ("oci://ghcr.io/a/b:v1", RegistryRef("https", "ghcr.io", "a/b", "v1")),
        ("http://127.0.0.1:5000/repo", RegistryRef("http", "127.0.0.1:5000", "repo")),
        (
            "https://Reg.Example:443/a__b/c-d.e",
            RegistryRef("https", "reg.example:443", "a__b/c-d.e"),
        ),
        # Loopback without a scheme is plain HTTP, as docker and crane take it.
        ("localhost/x:latest", RegistryRef("http", "localhost", "x", "latest")),
        ("[::1]:5000/x", RegistryRef("http", "[::1]:5000", "x")),
        ("127.0.0.1:5055/repo", RegistryRef("http", "127.0.0.1:5055", "repo")),
        ("127.8.9.10/repo", RegistryRef("http", "127.8.9.10", "repo")),
        ("docker://localhost:5000/r:v1", RegistryRef("http", "localhost:5000", "r", "v1")),
        ("https://localhost:5000/x", RegistryRef("https", "localhost:5000", "x")),
        ("https://[::1]/x", RegistryRef("https", "[::1]", "x")),
        ("10.0.0.1:5000/x", RegistryRef("https", "10.0.0.1:5000", "x")),
        ("localhost.example/x", RegistryRef("https", "localhost.example", "x")),
        (
            "h.io/r:v1@sha256:" + "b" * 64,
            RegistryRef("https", "h.io", "r", "v1", "sha256:" + "b" * 64),
        ),
    ],
)
def test_parse_registry_ref(text: str, expected: RegistryRef) -> None:
    ref = parse_registry_ref(text)
    assert ref == expected
    assert parse_registry_ref(str(ref)) == ref  # round trip


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("dualeai/exec-sandbox-assets", "not a registry host"),
        ("ghcr.io", "HOST/REPOSITORY"),
        ("ghcr.io/", "HOST/REPOSITORY"),
        ("ghcr.io/Dualeai/x", "path component 'Dualeai'"),
        ("ghcr.io/a//b", "path component ''"),
        ("ghcr.io/a-/b", "path component 'a-'"),
        ("ghcr.io/a:bad!tag", "invalid tag"),
        ("ghcr.io/a@sha256:abc", "invalid digest"),
        ("ftp://ghcr.io/a", "unsupported scheme"),
        ("bad_host.io/a", "invalid registry host"),
        ("h.io:99999/a", "invalid port"),
        ("h.io/" + "a" * 256, "longer than 255"),
    ],
)
def test_parse_registry_ref_rejects(text: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_registry_ref(text)
    assert repr(text)[:40].rstrip("'") in str(info.value)
    assert why in str(info.value)


def test_registry_ref_urls_key_and_tags() -> None:
    ref = parse_registry_ref("http://127.0.0.1:5000/test/repo:v1")
    assert ref.base_url == "http://127.0.0.1:5000"
    assert ref.repo_url == "http://127.0.0.1:5000/v2/test/repo"
    assert str(ref) == "http://127.0.0.1:5000/test/repo:v1"
    assert ref.reference == "v1"
    pinned = ref.with_digest("sha256:" + "c" * 64)
    assert pinned.reference == "sha256:" + "c" * 64
    assert pinned.with_tag("sha256-" + "c" * 64 + ".sig").digest is None
    with pytest.raises(ConfigError):
        ref.with_tag("no/slash")
    # key: same for any tag/scheme, differs per repository, safe as a file name
    keys = {
        parse_registry_ref(t).key
        for t in ("ghcr.io/a/b_c", "ghcr.io/a_b/c", "ghcr.io/a/b_c:v2", "http://ghcr.io/a/b_c")
    }
    assert len(keys) == 2
    for key in keys | {parse_registry_ref("[::1]:5000/x").key}:
        assert "/" not in key and not key.startswith(".") and len(key) < 120


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("oci:/srv/layout", LayoutRef("oci", Path("/srv/layout"), None)),
        ("oci:/srv/layout:v0.22.0", LayoutRef("oci", Path("/srv/layout"), "v0.22.0")),
        ("oci:rel/dir", LayoutRef("oci", Path("rel/dir"), None)),
        ("oci-archive:/tmp/a.tar:latest", LayoutRef("oci-archive", Path("/tmp/a.tar"), "latest")),
        ("oci-archive:a.tar", LayoutRef("oci-archive", Path("a.tar"), None)),
        # a colon followed by something that is not a tag stays in the path
        ("oci:/data/x:y/z", LayoutRef("oci", Path("/data/x:y/z"), None)),
        ("oci:/data/a:b:v1", LayoutRef("oci", Path("/data/a:b"), "v1")),
        # a trailing ':' means "no tag" and keeps a tag-like suffix in the path
        ("oci:/data/a:b:", LayoutRef("oci", Path("/data/a:b"), None)),
        # nothing before the colon: the whole text is the path
        ("oci::v1", LayoutRef("oci", Path(":v1"), None)),
    ],
)
def test_parse_source_ref_layouts(text: str, expected: LayoutRef) -> None:
    ref = parse_source_ref(text)
    assert ref == expected
    assert parse_source_ref(str(ref)) == ref


def test_parse_source_ref_registry_and_errors() -> None:
    assert parse_source_ref("ghcr.io/a/b:v1") == RegistryRef("https", "ghcr.io", "a/b", "v1")
    assert parse_source_ref("oci://ghcr.io/a/b") == RegistryRef("https", "ghcr.io", "a/b")
    for bad in ("oci:", "oci-archive:", "oci-archive::"):
        with pytest.raises(ConfigError, match="missing path"):
            parse_source_ref(bad)


# --------------------------------------------------------------------------
# Auth pieces (pure)
# --------------------------------------------------------------------------


def test_parse_www_authenticate() -> None:
    [c] = parse_www_authenticate(
        'Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:a/b:pull,push"'
    )
    assert c.scheme == "bearer"
    assert c.params == {
        "realm": "https://ghcr.io/token",
        "service": "ghcr.io",
        "scope": "repository:a/b:pull,push",
    }
    [c] = parse_www_authenticate('Basic realm="exec, sandbox"')
    assert (c.scheme, c.params) == ("basic", {"realm": "exec, sandbox"})
    both = parse_www_authenticate(
        'Bearer realm="a\\"b", error="invalid_token", Basic realm=r, Negotiate'
    )
    assert [(c.scheme, c.params) for c in both] == [
        ("bearer", {"realm": 'a"b', "error": "invalid_token"}),
        ("basic", {"realm": "r"}),
        ("negotiate", {}),
    ]
    [c] = parse_www_authenticate("Basic dXNlcjpw==")
    assert c.params == {"": "dXNlcjpw=="}
    assert parse_www_authenticate("") == []


def test_credentials_repr_hides_password() -> None:
    creds = Credentials("alice", "wonderland")
    assert "wonderland" not in repr(creds)
    assert "alice" in repr(creds)


def _write_config(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc))
    return path


def test_load_docker_credentials(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    b64 = base64.b64encode(b"alice:pa:ss").decode()
    cfg = _write_config(
        tmp_path / "config.json",
        {
            "auths": {
                "https://reg.example:5000/v1/": {"auth": b64},
                "http://plain.example": {"username": "bob", "password": "pw"},
                "token.example": {"identitytoken": "tok", "auth": b64},
                "empty.example": {},
            },
            "credHelpers": {"helper.example": "ecr-login"},
        },
    )
    assert load_docker_credentials("reg.example:5000", cfg) == Credentials("alice", "pa:ss")
    assert load_docker_credentials("REG.example:5000", cfg) == Credentials("alice", "pa:ss")
    assert load_docker_credentials("reg.example", cfg) is None  # the port is part of the host
    assert load_docker_credentials("plain.example", cfg) == Credentials("bob", "pw")
    assert load_docker_credentials("token.example", cfg) == Credentials("<token>", "tok")
    assert load_docker_credentials("empty.example", cfg) is None
    assert load_docker_credentials("other.example", cfg) is None
    assert load_docker_credentials("x", None) is None
    assert load_docker_credentials("x", tmp_path / "missing.json") is None
    caplog.set_level("DEBUG", logger="exec_sandbox_assets.oci.auth")
    assert load_docker_credentials("helper.example", cfg) is None
    assert load_docker_credentials("helper.example", cfg) is None
    assert len([r for r in caplog.records if "not supported" in r.getMessage()]) == 1
    # An exact host key wins over URL spellings of the same host.
    cfg2 = _write_config(
        tmp_path / "c2.json",
        {
            "auths": {
                "https://h.io": {"username": "u1", "password": "a"},
                "h.io": {"username": "u2", "password": "b"},
            }
        },
    )
    assert load_docker_credentials("h.io", cfg2) == Credentials("u2", "b")


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        '{"auths": []}',
        '{"auths": {"h.io": "x"}}',
        '{"auths": {"h.io": {"auth": "!!notbase64"}}}',
        '{"auths": {"h.io": {"auth": "' + base64.b64encode(b"nocolon").decode() + '"}}}',
    ],
)
def test_load_docker_credentials_malformed(tmp_path: Path, content: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_docker_credentials("h.io", path)
    assert str(path) in str(info.value)


def test_registry_auth_is_async_only() -> None:
    with (
        httpx.Client(auth=RegistryAuth("127.0.0.1:9")) as client,
        pytest.raises(RuntimeError, match="async-only"),
    ):
        client.get("http://127.0.0.1:9/v2/")


def test_registry_auth_host_matching() -> None:
    auth = RegistryAuth("ghcr.io", scheme="https")
    assert auth.is_registry_url(httpx.URL("https://ghcr.io/v2/"))
    assert auth.is_registry_url(httpx.URL("https://ghcr.io:443/v2/"))
    assert not auth.is_registry_url(httpx.URL("https://ghcr.io:8443/v2/"))
    assert not auth.is_registry_url(httpx.URL("http://ghcr.io/v2/"))
    assert not auth.is_registry_url(httpx.URL("https://pkg-containers.githubusercontent.com/x"))
    local = RegistryAuth("127.0.0.1:5000", scheme="http")
    assert local.is_registry_url(httpx.URL("http://127.0.0.1:5000/v2/"))
    assert not local.is_registry_url(httpx.URL("http://localhost:5000/v2/"))


def test_token_realm_gets_basic_credentials_only_over_tls_from_a_tls_registry() -> None:
    """Decided: a realm on another host gets them (docker does; the registry chose it),
    a plain-HTTP realm of an https registry never does."""
    from exec_sandbox_assets.oci.auth import Challenge

    auth = RegistryAuth("reg.example", Credentials("u", "p"), scheme="https")
    url = httpx.URL("https://reg.example/v2/a/manifests/v1")

    def sent(realm: str) -> str | None:
        request = auth._token_request(Challenge("bearer", {"realm": realm}), url, httpx.Headers())
        header: str | None = request.headers.get("authorization")
        return header

    assert sent("https://auth.other.example/token") is not None
    assert sent("http://auth.other.example/token") is None
    assert sent("http://reg.example/token") is None
    plain = RegistryAuth("reg.example", Credentials("u", "p"), scheme="http")
    request = plain._token_request(
        Challenge("bearer", {"realm": "http://reg.example/token"}),
        httpx.URL("http://reg.example/v2/a/manifests/v1"),
        httpx.Headers(),
    )
    assert request.headers.get("authorization") is not None
    for bad in ("file:///etc/passwd", "ftp://x/token", "", "token"):
        with pytest.raises(AuthError, match="bad realm"):
            sent(bad)


def test_retry_policy() -> None:
    policy = RetryPolicy(base_delay=0.5, max_delay=2.0, max_retry_after=30.0)
    for attempt in range(1, 8):
        assert 0.0 <= policy.backoff(attempt) <= min(2.0, 0.5 * 2 ** (attempt - 1))
    assert policy.retry_after("3") == 3.0
    assert policy.retry_after("1000") == 30.0
    assert policy.retry_after("-5") == 0.0
    assert policy.retry_after("soon") is None
    assert policy.retry_after(None) is None
    future = email.utils.formatdate(time.time() + 10, usegmt=True)
    delay = policy.retry_after(future)
    assert delay is not None and 8.0 <= delay <= 10.0
    past = email.utils.formatdate(time.time() - 100, usegmt=True)
    assert policy.retry_after(past) == 0.0
    with pytest.raises(ConfigError):
        RetryPolicy(attempts=0)


# --------------------------------------------------------------------------
# Plain registry
# --------------------------------------------------------------------------


async def test_manifest_by_tag_and_digest(registry: RegistryServer, repo_name: str) -> None:
    manifest, digest = push_artifact(registry, repo_name)
    async with RegistryClient(ref_of(registry, repo_name), retry=FAST) as client:
        await client.ping()
        data, media_type, got = await client.get_manifest("v1")
        assert (data, media_type, got) == (manifest, MEDIA_TYPE_MANIFEST, digest)
        assert await client.get_manifest(digest) == (manifest, MEDIA_TYPE_MANIFEST, digest)
        assert await client.list_tags() == ["v1"]
        with pytest.raises(ConfigError):
            await client.get_manifest("../v1")


async def test_manifest_missing_is_not_found(registry: RegistryServer, repo_name: str) -> None:
    push_artifact(registry, repo_name)
    ref = ref_of(registry, repo_name)
    async with RegistryClient(ref, retry=FAST) as client:
        missing = "sha256:" + "0" * 64
        with pytest.raises(AssetNotFoundError) as info:
            await client.get_manifest(missing)
        message = str(info.value)
        assert f"GET {ref.repo_url}/manifests/{missing}" in message
        assert "404" in message and "MANIFEST_UNKNOWN" in message
        with pytest.raises(AssetNotFoundError, match="tags/list"):
            await RegistryClient(ref_of(registry, "no/such/repo"), retry=FAST).list_tags()


async def test_wrong_bytes_refused(
    registry: RegistryServer, repo_name: str, fault_proxy: FaultProxyFactory
) -> None:
    _, digest = push_artifact(registry, repo_name)
    proxy = fault_proxy(registry)
    proxy.flip_byte_at = 10
    ref = ref_of(proxy, repo_name)
    async with RegistryClient(ref, retry=FAST) as client:
        with pytest.raises(AssetChecksumError) as info:
            await client.get_manifest(digest)
        assert f"{ref.repo_url}/manifests/{digest}" in str(info.value)
        # By tag, the Docker-Content-Digest header is the check.
        with pytest.raises(AssetChecksumError) as info:
            await client.get_manifest("v1")
        assert f"manifest {repo_name}:v1" in str(info.value)
        with pytest.raises(AssetChecksumError, match="blobs/"):
            await client.get_blob(sha256(BLOB), len(BLOB))
    # A checksum failure is a trust error: never retried.
    assert len(proxy.requests) == 3


async def test_blobs_range_exists_and_caps(registry: RegistryServer, repo_name: str) -> None:
    push_artifact(registry, repo_name)
    digest = sha256(BLOB)
    async with RegistryClient(ref_of(registry, repo_name), retry=FAST) as client:
        assert await client.get_blob(digest, len(BLOB)) == BLOB
        with pytest.raises(SizeLimitError, match="exceeds"):
            await client.get_blob(digest, len(BLOB) - 1)
        async with client.open_blob(digest) as stream:
            assert (stream.offset, stream.total) == (0, len(BLOB))
            chunks = [c async for c in stream.chunks()]
        assert b"".join(chunks) == BLOB
        assert max(len(c) for c in chunks) <= 1024 * 1024
        offset = 1024 * 1024 + 7
        async with client.open_blob(digest, offset) as stream:
            assert (stream.offset, stream.total) == (offset, len(BLOB))
            assert b"".join([c async for c in stream.chunks()]) == BLOB[offset:]
        assert await client.blob_exists(digest)
        assert not await client.blob_exists("sha256:" + "1" * 64)
        with pytest.raises(AssetNotFoundError, match="BLOB_UNKNOWN"):
            await client.get_blob("sha256:" + "1" * 64, 10)


async def test_blob_body_cut_then_resume(
    registry: RegistryServer, repo_name: str, fault_proxy: FaultProxyFactory
) -> None:
    push_artifact(registry, repo_name)
    digest = sha256(BLOB)
    proxy = fault_proxy(registry)
    proxy.match_path = "/blobs/"
    proxy.cut_after_bytes = 1_500_000
    proxy.cut_times = 1
    async with RegistryClient(ref_of(proxy, repo_name), retry=FAST) as client:
        received = bytearray()
        with pytest.raises(AssetDownloadError, match="broke off"):
            async with client.open_blob(digest) as stream:
                async for chunk in stream.chunks():
                    received += chunk
        assert 0 < len(received) <= 1_500_000
        offset, rest = await read_stream(client, digest, len(received))
        assert offset == len(received)
        assert bytes(received) + rest == BLOB
        assert proxy.requests[-1].headers["range"] == f"bytes={len(received)}-"
        assert proxy.requests[-1].status == 206
        # A small blob whose body breaks is simply fetched again.
        proxy.cut_times = 1
        assert await client.get_blob(digest, len(BLOB)) == BLOB


async def test_retry_429_with_retry_after(
    registry: RegistryServer, repo_name: str, fault_proxy: FaultProxyFactory
) -> None:
    manifest, _ = push_artifact(registry, repo_name)
    proxy = fault_proxy(registry)
    proxy.fail_first, proxy.fail_status, proxy.retry_after = 1, 429, "1"
    async with RegistryClient(ref_of(proxy, repo_name), retry=FAST) as client:
        started = time.monotonic()
        data, _, _ = await client.get_manifest("v1")
        elapsed = time.monotonic() - started
    assert data == manifest
    assert elapsed >= 0.9  # Retry-After honoured over the 10 ms backoff
    assert [r.status for r in proxy.requests] == [429, 200]


async def test_5xx_exhausted_and_4xx_not_retried(
    registry: RegistryServer, repo_name: str, fault_proxy: FaultProxyFactory
) -> None:
    push_artifact(registry, repo_name)
    proxy = fault_proxy(registry)
    proxy.fail_first, proxy.fail_status = 10, 503
    ref = ref_of(proxy, repo_name)
    async with RegistryClient(ref, retry=FAST) as client:
        with pytest.raises(AssetDownloadError) as info:
            await client.get_manifest("v1")
        message = str(info.value)
        assert f"GET {ref.repo_url}/manifests/v1: 503" in message
        assert "UNAVAILABLE" in message and "after 3 attempts" in message
        assert len(proxy.requests) == 3
        proxy.reset()
        with pytest.raises(AssetNotFoundError):
            await client.get_manifest("nope")
        assert len(proxy.requests) == 1


async def test_unreachable_registry() -> None:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port = s.getsockname()[1]
    ref = parse_registry_ref(f"http://{LOOPBACK}:{port}/x")
    async with RegistryClient(ref, retry=FAST) as client:
        with pytest.raises(AssetDownloadError) as info:
            await client.get_manifest("v1")
    assert f"registry at http://{LOOPBACK}:{port} is unreachable" in str(info.value)
    assert f"http://{LOOPBACK}:{port}/v2/x/manifests/v1" in str(info.value)


# --------------------------------------------------------------------------
# Auth: token (ghcr.io-like) and htpasswd
# --------------------------------------------------------------------------


async def test_token_auth_anonymous_pull(token_registry: RegistryServer, repo_name: str) -> None:
    manifest, digest = push_artifact(token_registry, repo_name)
    tokens = token_registry.token_server
    assert tokens is not None
    async with RegistryClient(ref_of(token_registry, repo_name), retry=FAST) as client:
        await client.ping()  # /v2/ wants a token too (one without scope)
        assert (await client.get_manifest("v1"))[0] == manifest
        # Concurrent requests for the same scope share one token fetch.
        results = await asyncio.gather(
            client.get_manifest(digest),
            *(client.blob_exists(sha256(BLOB)) for _ in range(5)),
            client.get_blob(sha256(BLOB), len(BLOB)),
        )
        assert results[-1] == BLOB
    fetched = [r for r in tokens.requests if r.path == "/token"]
    assert len(fetched) == 2
    assert "scope" not in fetched[0].query
    assert fetched[1].query["scope"] == [f"repository:{repo_name}:pull"]
    assert fetched[1].query["service"] == [tokens.service]
    assert not any(r.authorization for r in fetched)  # anonymous: no credentials to send


async def test_token_expiry_refetches(token_registry: RegistryServer, repo_name: str) -> None:
    push_artifact(token_registry, repo_name)
    tokens = token_registry.token_server
    assert tokens is not None
    tokens.token_ttl = 1  # client keeps it max(ttl - 5, ttl / 2) = 0.5 s
    async with RegistryClient(ref_of(token_registry, repo_name), retry=FAST) as client:
        await client.get_manifest("v1")
        await client.get_manifest("v1")
        assert len(tokens.requests) == 1
        await asyncio.sleep(0.6)
        await client.get_manifest("v1")
    assert len(tokens.requests) == 2


async def test_token_auth_with_credentials(token_registry: RegistryServer, repo_name: str) -> None:
    push_artifact(token_registry, repo_name)
    tokens = token_registry.token_server
    assert tokens is not None
    user, password = next(iter(TOKEN_USERS.items()))
    ref = ref_of(token_registry, repo_name)
    async with RegistryClient(ref, credentials=Credentials(user, password)) as client:
        await client.get_manifest("v1")
    assert tokens.requests[-1].authorization and tokens.requests[-1].user == user
    async with RegistryClient(ref, credentials=Credentials(user, "wrong"), retry=FAST) as client:
        with pytest.raises(AuthError) as info:
            await client.get_manifest("v1")
    assert f"token endpoint {tokens.realm}" in str(info.value)
    assert "401" in str(info.value) and f"GET {ref.repo_url}/manifests/v1" in str(info.value)


async def test_htpasswd_with_docker_config(
    htpasswd_registry: RegistryServer, repo_name: str, tmp_path: Path
) -> None:
    manifest, _ = push_artifact(htpasswd_registry, repo_name)
    user, password = next(iter(HTPASSWD_USERS.items()))
    config = _write_config(
        tmp_path / "config.json",
        {
            "auths": {
                f"http://{htpasswd_registry.host}": {
                    "auth": base64.b64encode(f"{user}:{password}".encode()).decode()
                }
            }
        },
    )
    creds = load_docker_credentials(htpasswd_registry.host, config)
    assert creds == Credentials(user, password)
    ref = ref_of(htpasswd_registry, repo_name)
    async with RegistryClient(ref, credentials=creds, retry=FAST) as client:
        assert (await client.get_manifest("v1"))[0] == manifest
        assert await client.get_blob(sha256(BLOB), len(BLOB)) == BLOB
    async with RegistryClient(ref, retry=FAST) as client:
        with pytest.raises(AuthError, match="no credentials configured"):
            await client.ping()
        with pytest.raises(AuthError) as info:
            await client.get_manifest("v1")
    assert "401" in str(info.value) and "no credentials configured" in str(info.value)
    assert ref.repo_url in str(info.value)
    async with RegistryClient(ref, credentials=Credentials(user, "bad"), retry=FAST) as client:
        with pytest.raises(AuthError, match="credentials were refused"):
            await client.blob_exists(sha256(BLOB))


# --------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------


async def test_tls_custom_ca(tls_registry: RegistryServer, repo_name: str) -> None:
    manifest, _ = push_artifact(tls_registry, repo_name)
    ref = parse_registry_ref(f"https://{tls_registry.host}/{repo_name}:v1")
    assert ref.scheme == "https"
    async with RegistryClient(ref, ca_bundle=tls_registry.ca_bundle, retry=FAST) as client:
        assert (await client.get_manifest("v1"))[0] == manifest
    # Not retried: tests/test_tls_trust.py counts the connections it opens.
    async with RegistryClient(ref, retry=RetryPolicy(attempts=4, base_delay=1.0)) as client:
        with pytest.raises(AssetDownloadError, match="not trusted"):
            await client.get_manifest("v1")
    with pytest.raises(ConfigError, match="CA bundle"):
        await RegistryClient(ref, ca_bundle=Path("/nonexistent/ca.pem")).ping()


# --------------------------------------------------------------------------
# Redirects to a blob CDN on another host must not carry credentials
# --------------------------------------------------------------------------


@pytest.fixture
def cdn(tmp_path: Path) -> Iterator[StaticServer]:
    root = tmp_path / "registry-data"
    root.mkdir()
    with StaticServer(root) as server:
        yield server


@pytest.mark.parametrize("auth", ["htpasswd", "token"])
async def test_redirect_to_other_host_drops_authorization(
    auth: Any, cdn: StaticServer, tmp_path: Path, repo_name: str
) -> None:
    users = HTPASSWD_USERS if auth == "htpasswd" else TOKEN_USERS
    # Same machine, different host string: "localhost" is another origin than 127.0.0.1.
    server = RedirectingRegistry(
        tmp_path / "reg", f"http://localhost:{cdn.port}", auth=auth, users=dict(users)
    )
    server.base_dir.mkdir()
    # The CDN serves the registry's own storage directory.
    server.base_dir.joinpath("data").symlink_to(cdn.root)
    with server:
        push_artifact(server, repo_name)
        creds = Credentials(*next(iter(users.items())))
        async with RegistryClient(ref_of(server, repo_name), credentials=creds) as client:
            assert await client.get_blob(sha256(BLOB), len(BLOB)) == BLOB
            offset, rest = await read_stream(client, sha256(BLOB), 100)
            assert (offset, rest) == (100, BLOB[100:])
    assert len(cdn.requests) == 2
    for record in cdn.requests:
        assert "authorization" not in record.headers
        assert record.headers["host"] == f"localhost:{cdn.port}"
    assert cdn.requests[1].headers["range"] == "bytes=100-"


async def test_challenge_from_redirect_target_is_ignored(tmp_path: Path, repo_name: str) -> None:
    with HostileCdn() as cdn:
        server = RedirectingRegistry(
            tmp_path / "reg",
            f"http://localhost:{cdn.port}",
            auth="htpasswd",
            users=dict(HTPASSWD_USERS),
        )
        with server:
            push_artifact(server, repo_name)
            creds = Credentials(*next(iter(HTPASSWD_USERS.items())))
            async with RegistryClient(
                ref_of(server, repo_name), credentials=creds, retry=FAST
            ) as client:
                with pytest.raises(AuthError) as info:
                    await client.get_blob(sha256(BLOB), len(BLOB))
    seen = cdn.seen
    message = str(info.value)
    assert "redirected to http://localhost:" in message and "DENIED" in message
    assert "redirect target" in message
    assert seen and all(auth is None for _, auth in seen)
    assert not any(path.startswith("/steal") for path, _ in seen)


async def test_blob_bodies_are_read_in_pieces_larger_than_httpcores_64_kib(
    static_server: StaticServer,
) -> None:
    """oci/transport.py: one event-loop turn per socket read, so large reads when the
    socket holds more (fails if an httpx/httpcore upgrade silently drops the wrapper)."""
    (static_server.root / "big").write_bytes(os.urandom(8 << 20))
    core = HttpCore(peer="static server")
    pieces: list[int] = []
    try:
        async with core.client().stream("GET", static_server.url_for("big")) as response:
            async for piece in response.aiter_raw():
                if not pieces:
                    await asyncio.sleep(0.2)  # let the socket buffer fill up
                pieces.append(len(piece))
    finally:
        await core.aclose()
    assert sum(pieces) == 8 << 20
    assert max(pieces) > 64 * 1024, pieces[:20]
