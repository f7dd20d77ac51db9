"""Hostile servers and local faults (issue #12): what a server can send, and what the
client does with it. Every server here is real, on loopback (tests/servers/scripted.py).

- Content-Encoding bombs and lies: every request asks for identity; an encoded body is
  refused, never inflated; no httpx exception escapes.
- JSON that `json.loads` fails on with something other than JSONDecodeError.
- Time: a whole-request deadline for metadata, a minimum rate for blob bodies.
- The air gap holds across redirects and token realms, with no DNS lookup.
- Secrets in URLs and control characters from servers never reach a terminal.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from exec_sandbox_assets.base.errors import (
    AssetDownloadError,
    AssetError,
    AssetNotFoundError,
    AuthError,
    BlockedHostError,
    ConfigError,
    FormatError,
    TransportError,
)
from exec_sandbox_assets.base.safetext import clean_text, redact_url
from exec_sandbox_assets.config import AIRGAP_BLOCKED_HOSTS, load_settings
from exec_sandbox_assets.oci.auth import load_docker_credentials
from exec_sandbox_assets.oci.http import HttpCore
from exec_sandbox_assets.oci.layout import LayoutReader
from exec_sandbox_assets.oci.model import MEDIA_TYPE_INDEX, Index, Manifest, sha256_digest
from exec_sandbox_assets.oci.policy import TransferPolicy
from exec_sandbox_assets.oci.reference import parse_registry_ref
from exec_sandbox_assets.oci.registry import RegistryClient
from exec_sandbox_assets.oci.retry import RetryPolicy
from servers.scripted import Answer, HostileServer, gzip_bomb, zstd_bomb

REPO = "test/repo"
MANIFEST_PATH = f"/v2/{REPO}/manifests/v1"
INDEX = json.dumps({"schemaVersion": 2, "mediaType": MEDIA_TYPE_INDEX, "manifests": []}).encode()
JSON_INDEX = (("Content-Type", MEDIA_TYPE_INDEX),)
FAST = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.05)
# Decoded, each bomb is far over every cap, and over the memory a read may use here.
BOMB_SIZE = 64 << 20
MEMORY_CEILING = 16 << 20


@pytest.fixture
def server() -> Iterator[HostileServer]:
    with HostileServer() as s:
        yield s


@pytest.fixture
async def client(server: HostileServer) -> AsyncIterator[RegistryClient]:
    async with RegistryClient(parse_registry_ref(f"http://{server.host}/{REPO}"), retry=FAST) as c:
        yield c


class PeakMemory:
    """Peak bytes the Python allocators held while the block ran (tracemalloc)."""

    peak = 0

    def __enter__(self) -> PeakMemory:
        tracemalloc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


# -- 1. Content-Encoding ------------------------------------------------------------------


async def test_every_request_asks_for_identity(server: HostileServer) -> None:
    """Manifest GETs (with their Accept list), blob GETs, redirects and the token request
    of an auth round all say `Accept-Encoding: identity` (httpx's default would
    advertise gzip, deflate, br and zstd)."""
    token = server.route("/token", Answer(200, b'{"token": "t"}'))
    challenge = f'Bearer realm="{token}",service="s",scope="repository:{REPO}:pull"'
    server.route("/v2/", Answer(401, headers=(("WWW-Authenticate", challenge),)))
    server.route(MANIFEST_PATH, Answer(302, headers=(("Location", "/index"),)))
    server.route("/index", Answer(200, INDEX, JSON_INDEX))
    core = HttpCore(peer="registry", retry=FAST)
    try:
        await core.read("GET", server.url_for(MANIFEST_PATH), {"Accept": "x/y"}, 1 << 20)
        async with core.open_stream(server.url_for("/index")) as stream:
            assert b"".join([c async for c in stream.chunks()]) == INDEX
    finally:
        await core.aclose()
    async with RegistryClient(parse_registry_ref(f"http://{server.host}/{REPO}")) as c:
        with pytest.raises(AuthError):
            await c.ping()  # 401 -> token -> retry -> 401 (the route always says 401)
    assert [r.path.split("?")[0] for r in server.requests] == [
        MANIFEST_PATH,
        "/index",
        "/index",
        "/v2/",
        "/token",
        "/v2/",
    ]
    assert {r.headers.get("accept-encoding") for r in server.requests} == {"identity"}


@pytest.mark.parametrize("encoding", ["zstd", "gzip"])
async def test_bomb_as_the_index_is_refused_not_inflated(
    server: HostileServer, client: RegistryClient, encoding: str
) -> None:
    bomb = zstd_bomb(BOMB_SIZE) if encoding == "zstd" else gzip_bomb(BOMB_SIZE)
    server.route(MANIFEST_PATH, Answer(200, bomb, (*JSON_INDEX, ("Content-Encoding", encoding))))
    with PeakMemory() as mem, pytest.raises(AssetDownloadError, match="Content-Encoding") as info:
        await client.get_manifest("v1")
    assert mem.peak < MEMORY_CEILING
    assert f"http://{server.host}{MANIFEST_PATH}" in str(info.value)  # names the source


async def test_bomb_as_an_error_body_is_not_inflated(
    server: HostileServer, client: RegistryClient
) -> None:
    server.route(
        MANIFEST_PATH,
        Answer(404, zstd_bomb(BOMB_SIZE), (("Content-Encoding", "zstd"),), reason="Not Found"),
    )
    with PeakMemory() as mem, pytest.raises(AssetNotFoundError, match="404"):
        await client.get_manifest("v1")
    assert mem.peak < MEMORY_CEILING


async def test_bomb_as_a_401_or_redirect_body_is_not_inflated(server: HostileServer) -> None:
    """httpx reads these bodies whole by itself, before any of our code sees them."""
    bomb = zstd_bomb(BOMB_SIZE)
    encoded = ("Content-Encoding", "zstd")
    server.route("/r", Answer(302, bomb, (("Location", "/index"), encoded)))
    server.route("/index", Answer(200, INDEX, JSON_INDEX))
    token = server.route("/token", Answer(200, b'{"token": "t"}'))
    challenge = ("WWW-Authenticate", f'Bearer realm="{token}",service="s"')
    server.route("/v2/", Answer(401, bomb, (challenge, encoded)))
    core = HttpCore(peer="registry", retry=FAST)
    try:
        with PeakMemory() as mem:
            _, body = await core.read("GET", server.url_for("/r"), {}, 1 << 20)
        assert body == INDEX
        assert mem.peak < MEMORY_CEILING
    finally:
        await core.aclose()
    async with RegistryClient(parse_registry_ref(f"http://{server.host}/{REPO}")) as c:
        with PeakMemory() as mem, pytest.raises(AuthError):
            await c.ping()  # 401 (bomb body) -> token -> 401 again
    assert mem.peak < MEMORY_CEILING


async def test_bomb_as_the_token_answer_is_refused(
    server: HostileServer, client: RegistryClient
) -> None:
    token = server.route(
        "/token", Answer(200, zstd_bomb(BOMB_SIZE), (("Content-Encoding", "zstd"),))
    )
    challenge = ("WWW-Authenticate", f'Bearer realm="{token}",service="s"')
    server.route(MANIFEST_PATH, Answer(401, headers=(challenge,)))
    with PeakMemory() as mem, pytest.raises(AuthError, match="Content-Encoding 'zstd'"):
        await client.get_manifest("v1")
    assert mem.peak < MEMORY_CEILING


async def test_garbage_labelled_gzip_is_a_transport_error(
    server: HostileServer, client: RegistryClient
) -> None:
    """Was: httpx.DecodingError escaped (no AssetError, so no next source)."""
    server.route(MANIFEST_PATH, Answer(200, b"not gzip at all", (("Content-Encoding", "gzip"),)))
    with pytest.raises(TransportError, match="gzip"):
        await client.get_manifest("v1")


async def test_encoded_blob_is_a_transport_error_not_a_checksum_error(
    server: HostileServer, client: RegistryClient
) -> None:
    """A proxy that gzips a blob sends other bytes than the digest names: a misbehaving
    server, not forged content, so the next source is tried (a TrustError would stop)."""
    data = b"blob" * 1000
    digest = sha256_digest(data)
    server.route(
        f"/v2/{REPO}/blobs/{digest}",
        Answer(200, gzip_bomb(len(data)), (("Content-Encoding", "gzip"),)),
    )
    with pytest.raises(AssetDownloadError, match="Content-Encoding 'gzip'"):
        async with client.open_blob(digest):
            pass
    with pytest.raises(AssetDownloadError, match="Content-Encoding"):
        await client.get_blob(digest, 1 << 20)


# -- 2. JSON that json.loads fails on with a plain ValueError ------------------------------

HUGE_INT = b"1" + b"0" * 5000  # int() refuses more than 4300 digits: a ValueError


def test_huge_integers_in_documents_are_format_errors(tmp_path: Path) -> None:
    manifest = b'{"schemaVersion": 2, "layers": [], "config": {"size": ' + HUGE_INT + b"}}"
    with pytest.raises(FormatError, match="4300 digits"):
        Manifest.from_bytes(manifest, "m")
    index = b'{"schemaVersion": 2, "manifests": [{"size": ' + HUGE_INT + b"}]}"
    with pytest.raises(FormatError, match="not valid JSON"):
        Index.from_bytes(index, "i")
    layout = tmp_path / "layout"
    layout.mkdir()
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_bytes(index)
    with pytest.raises(FormatError, match=str(layout / "index.json")):
        LayoutReader.open(layout).index()
    (layout / "oci-layout").write_bytes(b'{"imageLayoutVersion": "1.0.0", "x": ' + HUGE_INT + b"}")
    with pytest.raises(FormatError, match="oci-layout"):
        LayoutReader.open(layout).index()
    config = tmp_path / "config.json"
    config.write_bytes(b'{"auths": {"h": {"x": ' + HUGE_INT + b"}}}")
    with pytest.raises(ConfigError, match="docker config"):
        load_docker_credentials("h", config)


async def test_huge_integers_from_servers_are_package_errors(
    server: HostileServer, client: RegistryClient
) -> None:
    body = b'{"errors": [{"code": "X", "detail": ' + HUGE_INT + b"}]}"
    server.route(MANIFEST_PATH, Answer(404, body, reason="Not Found"))
    with pytest.raises(AssetNotFoundError, match="404"):
        await client.get_manifest("v1")
    server.route(f"/v2/{REPO}/tags/list", Answer(200, b'{"tags": [], "n": ' + HUGE_INT + b"}"))
    with pytest.raises(FormatError, match="tag list"):
        await client.list_tags()
    token = server.route("/token", Answer(200, b'{"token": "t", "expires_in": ' + HUGE_INT + b"}"))
    challenge = ("WWW-Authenticate", f'Bearer realm="{token}",service="s"')
    server.route(MANIFEST_PATH, Answer(401, headers=(challenge,)))
    with pytest.raises(AuthError, match="did not answer JSON"):
        await client.get_manifest("v1")


# -- 5. deadline and minimum rate ----------------------------------------------------------


async def test_trickled_index_hits_the_source_deadline(server: HostileServer) -> None:
    """Was: one byte every few seconds kept a read going for minutes (each byte resets
    httpx's read timeout)."""
    server.route(MANIFEST_PATH, Answer(200, INDEX, JSON_INDEX, trickle=(1, 0.2)))
    ref = parse_registry_ref(f"http://{server.host}/{REPO}")
    policy = TransferPolicy(deadline=1.0)
    async with RegistryClient(ref, retry=FAST, policy=policy) as c:
        started = time.monotonic()
        with pytest.raises(AssetDownloadError, match="source timeout of 1 s"):
            await c.get_manifest("v1")
    assert time.monotonic() - started < 3


async def test_silent_server_costs_one_deadline_not_every_retry(server: HostileServer) -> None:
    """Was: 4 attempts x 30 s read timeout (+ backoff) = 122 s before the next source."""
    server.route(MANIFEST_PATH, Answer(200, INDEX, stall=60))
    digest = sha256_digest(b"x")
    server.route(f"/v2/{REPO}/blobs/{digest}", Answer(200, b"x", stall=60))
    ref = parse_registry_ref(f"http://{server.host}/{REPO}")
    retry = RetryPolicy(attempts=4, base_delay=0.01)
    async with RegistryClient(ref, retry=retry, timeout=30, policy=TransferPolicy(1.0)) as c:
        started = time.monotonic()
        with pytest.raises(AssetDownloadError, match="gave no complete answer within"):
            await c.get_manifest("v1")
        with pytest.raises(AssetDownloadError, match="gave no answer within the source timeout"):
            async with c.open_blob(digest):
                pass
    assert time.monotonic() - started < 4


async def test_trickled_blob_falls_below_the_minimum_rate(server: HostileServer) -> None:
    data = bytes(range(256)) * 8
    digest = sha256_digest(data)
    server.route(f"/v2/{REPO}/blobs/{digest}", Answer(200, data, trickle=(4, 0.1)))
    ref = parse_registry_ref(f"http://{server.host}/{REPO}")
    policy = TransferPolicy(min_rate=200, rate_window=0.5)  # 100 bytes per 0.5 s; gets ~20
    async with RegistryClient(ref, retry=FAST, policy=policy) as c:
        started = time.monotonic()
        received = 0
        with pytest.raises(AssetDownloadError, match="minimum rate of 200 bytes/s") as info:
            async with c.open_blob(digest) as stream:
                async for chunk in stream.chunks():
                    received += len(chunk)
    assert time.monotonic() - started < 2
    assert "gave up after" in str(info.value)


async def test_slow_consumer_is_not_blamed_on_the_server(server: HostileServer) -> None:
    """Only time spent waiting for the network counts toward the minimum rate."""
    data = bytes(3 << 20)
    digest = sha256_digest(data)
    server.route(f"/v2/{REPO}/blobs/{digest}", Answer(200, data))
    ref = parse_registry_ref(f"http://{server.host}/{REPO}")
    policy = TransferPolicy(min_rate=1 << 20, rate_window=0.2)
    async with RegistryClient(ref, retry=FAST, policy=policy) as c:
        got = bytearray()
        async with c.open_blob(digest) as stream:
            async for chunk in stream.chunks():
                got += chunk
                await asyncio.sleep(0.4)  # a slow disk: longer than the window
    assert bytes(got) == data


def test_settings_carry_the_timeouts_and_the_air_gap() -> None:
    settings = load_settings(
        env={"EXEC_SANDBOX_SOURCE_TIMEOUT": "2.5", "EXEC_SANDBOX_MIN_RATE": "0"},
        cache_dir="/tmp/x",
    )
    policy = settings.transfer_policy()
    assert (policy.deadline, policy.min_rate, policy.blocked_hosts) == (2.5, 0, ())
    default = load_settings(env={}, cache_dir="/tmp/x").transfer_policy()
    assert (default.deadline, default.min_rate) == (30.0, 1024)
    airgap = load_settings(env={"EXEC_SANDBOX_AIRGAP": "1"}, cache_dir="/tmp/x")
    assert airgap.transfer_policy().blocked_hosts == AIRGAP_BLOCKED_HOSTS
    for name, value in (("SOURCE_TIMEOUT", "0"), ("SOURCE_TIMEOUT", "nan"), ("MIN_RATE", "-1")):
        with pytest.raises(ConfigError, match=f"EXEC_SANDBOX_{name}"):
            load_settings(env={f"EXEC_SANDBOX_{name}": value}, cache_dir="/tmp/x")


# -- 9. the air gap holds across redirects ------------------------------------------------

_LOOKUPS: list[str] = []
_GUARD_ON: list[bool] = []


def _refuse_remote(event: str, args: tuple[Any, ...]) -> None:
    """Audit hook: record every name lookup and connect; refuse any not to loopback, so
    a failing test cannot reach (or wait on) the real DNS."""
    if not _GUARD_ON:
        return
    if event == "socket.getaddrinfo":
        name = args[0]
    elif event == "socket.connect" and isinstance(args[1], tuple):
        name = args[1][0]
    else:
        return
    host = name.decode() if isinstance(name, bytes) else str(name)
    _LOOKUPS.append(host)
    if host not in ("127.0.0.1", "localhost"):
        raise OSError(f"test guard: no network beyond loopback ({host})")


@pytest.fixture
def network_log() -> Iterator[list[str]]:
    if not getattr(sys, "_exec_sandbox_refuse_remote", False):
        sys.addaudithook(_refuse_remote)  # hooks cannot be removed: switched per test
        sys._exec_sandbox_refuse_remote = True  # type: ignore[attr-defined]
    _LOOKUPS.clear()
    _GUARD_ON.append(True)
    try:
        yield _LOOKUPS
    finally:
        _GUARD_ON.clear()


AIRGAP = load_settings(env={"EXEC_SANDBOX_AIRGAP": "1"}, cache_dir="/tmp/x").transfer_policy()


@pytest.mark.parametrize(
    ("status", "target"),
    [
        (302, "https://github.com/dualeai/exec-sandbox/releases/download/v1/x"),
        (302, "https://objects.githubusercontent.com/github-production-release-asset/x?sig=1"),
        (307, "https://ghcr.io/v2/dualeai/exec-sandbox-assets/manifests/v1"),
        (307, "https://pkg-containers.githubusercontent.com/ghcr1/blobs/sha256:00"),
    ],
)
async def test_airgap_refuses_a_redirect_to_github_before_any_lookup(
    server: HostileServer, network_log: list[str], status: int, target: str
) -> None:
    server.route("/file", Answer(status, headers=(("Location", target),)))
    core = HttpCore(peer="release server", retry=FAST, policy=AIRGAP)
    try:
        with pytest.raises(BlockedHostError, match="air gap") as info:
            await core.read("GET", server.url_for("/file"), {}, 1 << 20)
        with pytest.raises(BlockedHostError, match="air gap"):
            async with core.open_stream(server.url_for("/file")):
                pass
    finally:
        await core.aclose()
    assert isinstance(info.value, TransportError)  # the next source is tried
    assert "sig=1" not in str(info.value)
    assert network_log, "the audit hook saw nothing: it is not working"
    assert set(network_log) <= {"127.0.0.1"}, network_log
    assert len(server.requests) == 2  # one each, not retried


async def test_airgap_refuses_a_token_realm_on_ghcr(
    server: HostileServer, network_log: list[str]
) -> None:
    realm = "https://ghcr.io/token"
    server.route(
        MANIFEST_PATH, Answer(401, headers=(("WWW-Authenticate", f'Bearer realm="{realm}"'),))
    )
    ref = parse_registry_ref(f"http://{server.host}/{REPO}")
    async with RegistryClient(ref, retry=FAST, policy=AIRGAP) as c:
        with pytest.raises(BlockedHostError, match=r"ghcr\.io.*air gap"):
            await c.get_manifest("v1")
    assert set(network_log) <= {"127.0.0.1"}, network_log


async def test_without_the_air_gap_the_redirect_is_followed(
    server: HostileServer, network_log: list[str]
) -> None:
    """The control: the same redirect, no air gap, and a lookup of github.com happens
    (refused by the test's guard, so it fails as unreachable)."""
    server.route("/file", Answer(302, headers=(("Location", "https://github.com/x"),)))
    core = HttpCore(peer="release server", retry=RetryPolicy(attempts=1))
    try:
        with pytest.raises(AssetDownloadError) as info:
            await core.read("GET", server.url_for("/file"), {}, 1 << 20)
    finally:
        await core.aclose()
    assert not isinstance(info.value, BlockedHostError)
    assert "github.com" in network_log


# -- 10. secrets and control characters ---------------------------------------------------


def test_redact_url_and_clean_text() -> None:
    assert redact_url("https://user:tok3n@h.example:8443/a/b") == "https://***@h.example:8443/a/b"
    assert (
        redact_url("https://cdn.example/f?X-Amz-Signature=abc&X-Amz-Credential=k&n=1&token=t")
        == "https://cdn.example/f?X-Amz-Signature=***&X-Amz-Credential=***&n=1&token=***"
    )
    assert redact_url("http://h/v2/r/tags/list?n=100") == "http://h/v2/r/tags/list?n=100"
    assert redact_url("https://u:p@[::1/x") == "https://***@[::1/x"  # unparsable: still hidden
    assert clean_text("ok\x1b[2J\r\n\u202egnp.exe\ud800") == (
        "ok\\x1b[2J\\x0d\\x0a\\u202egnp.exe\\ud800"
    )
    assert clean_text("x" * 500, 10) == "x" * 10 + "..."
    assert redact_url("u:pw@host:5000/repo@sha256:00") == "***@host:5000/repo@sha256:00"


def test_a_reference_with_credentials_is_refused_without_echoing_them() -> None:
    for text in ("https://bob:t0psecret@registry.example/repo", "bob:t0psecret@h.example/r"):
        with pytest.raises(ConfigError, match="invalid registry reference") as info:
            parse_registry_ref(text)
        assert "t0psecret" not in str(info.value) and "***@" in str(info.value)


async def test_credentials_in_a_url_stay_out_of_errors_and_logs(
    server: HostileServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.route("/busy", Answer(503, reason="Service Unavailable"))
    core = HttpCore(peer="release server", retry=FAST)
    url = f"http://alice:s3cr3t-t0ken@{server.host}/busy?token=qu3ry-s3cret"
    try:
        with caplog.at_level(logging.DEBUG), pytest.raises(AssetDownloadError) as info:
            await core.read("GET", url, {}, 1 << 20)
    finally:
        await core.aclose()
    ours = [f"{r.getMessage()} {r.__dict__}" for r in caplog.records if r.name.startswith("exec")]
    every = [f"{r.getMessage()} {r.__dict__}" for r in caplog.records]
    assert "503" in str(info.value) and "***@" in str(info.value)
    assert ours and "s3cr3t" not in "".join([str(info.value), *every])
    # httpx's own INFO line logs the query it sent; ours never do.
    assert "qu3ry" not in "".join([str(info.value), *ours])
    basic = base64.b64encode(b"alice:s3cr3t-t0ken").decode()
    assert {r.headers.get("authorization") for r in server.requests} == {f"Basic {basic}"}


async def test_server_text_cannot_drive_the_terminal(
    server: HostileServer, client: RegistryClient
) -> None:
    evil = "\x1b]0;pwned\x07\x1b[2J\nfake line\u202e"
    body = json.dumps({"errors": [{"code": "DENIED", "message": evil}]}).encode()
    server.route(MANIFEST_PATH, Answer(404, body, reason="Not\x1b[31mFound"))
    with pytest.raises(AssetNotFoundError) as info:
        await client.get_manifest("v1")
    message = str(info.value)
    assert "DENIED" in message and "\\x1b[2J" in message
    assert not any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 or c == "\u202e" for c in message)
    token = server.route("/token", Answer(500, reason="Oops\x1b[2J"))
    challenge = ("WWW-Authenticate", f'Bearer realm="{token}\x1b[2J"')
    server.route(MANIFEST_PATH, Answer(401, headers=(challenge,)))
    with pytest.raises(AuthError) as auth_info:
        await client.get_manifest("v1")
    assert "\x1b" not in str(auth_info.value)


def test_docker_config_error_messages_are_package_errors(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    auth = base64.b64encode(b"u:p").decode()
    config.write_text(json.dumps({"auths": {"h": {"auth": auth}, "H": {"auth": auth}}}))
    assert load_docker_credentials("h", config) is not None
    config.write_text('{"auths": {"h": {}}, "auths": {}}')  # duplicate keys: ambiguous
    with pytest.raises(ConfigError, match="duplicate key"):
        load_docker_credentials("h", config)


def test_every_error_here_is_an_asset_error() -> None:
    for cls in (BlockedHostError, FormatError, AuthError, AssetDownloadError):
        assert issubclass(cls, AssetError)


def test_airgap_holds_end_to_end_when_the_release_server_redirects(
    server: HostileServer, network_log: list[str], tmp_path: Path
) -> None:
    """The whole client: air-gapped, a private release server that redirects every file
    to GitHub's CDN. The fetch must fail on the air gap, with no lookup of the CDN."""
    from exec_sandbox_assets.base.errors import AllSourcesFailedError
    from exec_sandbox_assets.client import AssetClient
    from exec_sandbox_assets.release import catalog
    from releases import make_key_pair

    cdn = "https://objects.githubusercontent.com/github-production-release-asset/x"
    for folder in ("latest/download", "download/v1.0.0"):
        server.route(
            f"/o/r/releases/{folder}/oci-index.json", Answer(302, headers=(("Location", cdn),))
        )
    key = make_key_pair(tmp_path / "keys")
    settings = load_settings(
        env={"EXEC_SANDBOX_AIRGAP": "1", "EXEC_SANDBOX_ASSET_VERSION": "1.0.0"},
        cache_dir=tmp_path / "cache",
        releases_url=server.url_for("/o/r/releases/download"),
        trusted_keys=(key.public,),
        docker_config=tmp_path / "none.json",
    ).with_(local_build_dir=None, host_os="linux", host_goarch="amd64")

    with pytest.raises(AllSourcesFailedError) as info:
        asyncio.run(AssetClient(settings).fetch(catalog.platform_assets("linux", "amd64")))

    assert set(network_log) <= {"127.0.0.1"}, network_log
    assert "air gap" in str(info.value)


@pytest.mark.parametrize(
    "command",
    [
        ["inspect", "ghcr.io/dualeai/exec-sandbox-assets:v1.0.0"],
        ["versions", "ghcr.io/dualeai/exec-sandbox-assets"],
    ],
)
def test_airgap_holds_for_every_command_that_reads_a_registry(
    network_log: list[str], command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`inspect` and `versions` open their sources with the settings' transfer policy:
    an air-gapped run refuses ghcr.io before any name lookup."""
    from exec_sandbox_assets.cli import main

    code = main(["--airgap", *command])
    assert code != 0
    assert "air gap" in capsys.readouterr().err
    assert "ghcr.io" not in network_log, network_log
