"""Attacks that do not belong to one module's tests: a hostile server, a booby-trapped
cache directory or layout, hostile documents.

Threat model, as decided in review (see also docs in store.py and auth.py):
- Servers, mirrors, layouts and archives are untrusted: nothing they send is used before
  its digest (and the index signature) verified, every body is capped, nothing blocks.
- The cache directory belongs to the user. Whoever can write it can change what boots,
  so record tampering is out of scope; but the store never follows a symlink or opens a
  FIFO/device at one of its own paths, so a planted link cannot make it write or
  truncate a file elsewhere, or hang the boot path.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from exec_sandbox_assets.base.errors import AssetDownloadError, AssetError, SizeLimitError
from exec_sandbox_assets.cache.store import Store
from exec_sandbox_assets.oci.auth import Credentials
from exec_sandbox_assets.oci.reference import parse_registry_ref
from exec_sandbox_assets.oci.registry import RegistryClient
from exec_sandbox_assets.oci.retry import RetryPolicy
from servers import RawServer, endless_chunked
from test_store import FileOpener, content_bytes, make_fixture

# -- a booby-trapped cache directory ------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def _blob_path(root: Path, digest: str) -> Path:
    algo, _, hexpart = digest.partition(":")
    return root / "blobs" / algo / hexpart


async def test_symlinked_partial_is_not_followed(root: Path, tmp_path: Path) -> None:
    fx = make_fixture(tmp_path)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious " * 1000)
    partial = _blob_path(root, fx.out.layer_digest).with_name(
        _blob_path(root, fx.out.layer_digest).name + ".partial"
    )
    partial.parent.mkdir(parents=True)
    partial.symlink_to(victim)

    path = await Store(root).ensure(fx.out, FileOpener(fx.blob))

    assert path.read_bytes() == fx.content
    assert victim.read_bytes() == b"precious " * 1000


async def test_symlinked_lock_file_is_not_followed(root: Path, tmp_path: Path) -> None:
    fx = make_fixture(tmp_path)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    locks = root / "locks"
    locks.mkdir(parents=True)
    (locks / f"out-{fx.out.version}-{fx.out.name}.lock").symlink_to(victim)

    path = await Store(root).ensure(fx.out, FileOpener(fx.blob))

    assert path.read_bytes() == fx.content
    assert victim.read_bytes() == b"precious"  # not truncated by the holder note


async def test_fifo_at_blob_path_does_not_hang(root: Path, tmp_path: Path) -> None:
    fx = make_fixture(tmp_path)
    blob = _blob_path(root, fx.out.layer_digest)
    blob.parent.mkdir(parents=True)
    os.mkfifo(blob)

    path = await asyncio.wait_for(Store(root).ensure(fx.out, FileOpener(fx.blob)), 20)
    assert path.read_bytes() == fx.content


async def test_fifo_at_record_path_does_not_hang_the_warm_path(root: Path, tmp_path: Path) -> None:
    fx = make_fixture(tmp_path)
    store = Store(root)
    await store.ensure(fx.out, FileOpener(fx.blob))
    record = root / f"v{fx.out.version}" / ".verified" / f"{fx.out.name}.json"
    record.unlink()
    os.mkfifo(record)

    # In a thread: a blocking open() of the FIFO would hang the test itself otherwise.
    result: list[object] = []
    thread = threading.Thread(
        target=lambda: result.append(store.lookup(fx.out.version, fx.out.name)), daemon=True
    )
    thread.start()
    thread.join(10)
    if thread.is_alive():  # unblock it: open a writer end
        fd = os.open(record, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        thread.join(5)
        pytest.fail("lookup blocked on a FIFO at the record path")
    assert result == [None]


def test_fifo_at_state_path_does_not_hang(root: Path) -> None:
    store = Store(root)
    store.write_state("tag-latest", {"version": "1.0"})
    state = root / "refs" / "tag-latest.json"
    state.unlink()
    os.mkfifo(state)
    result: list[object] = []
    thread = threading.Thread(
        target=lambda: result.append(store.read_state("tag-latest")), daemon=True
    )
    thread.start()
    thread.join(10)
    if thread.is_alive():
        os.close(os.open(state, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail("read_state blocked on a FIFO")
    assert result == [None]


async def test_source_over_sending_after_a_resume_keeps_the_earlier_bytes(
    root: Path, tmp_path: Path
) -> None:
    fx = make_fixture(tmp_path)
    store = Store(root)
    half = 4 * 64 * 1024
    with pytest.raises(AssetDownloadError, match="truncated"):
        await store.ensure(fx.out, FileOpener(fx.blob, cut_at=half))
    assert [size for _, size in store.partials()] == [half]

    with pytest.raises(SizeLimitError, match="sent more than"):
        await store.ensure(fx.out, FileOpener(fx.blob, extra=b"junk" * 100))
    # The liar's bytes are dropped; what an earlier attempt fetched is kept for resume.
    assert [size for _, size in store.partials()] == [half]

    opener = FileOpener(fx.blob)
    assert (await store.ensure(fx.out, opener)).read_bytes() == fx.content
    assert opener.offsets == [half]


# -- a hostile HTTP server ------------------------------------------------------------------------


SENT_LIMIT = 256 * 1024 * 1024


ONE_TRY = RetryPolicy(attempts=1, base_delay=0, max_delay=0)


def _client(url: str, credentials: Credentials | None = None) -> RegistryClient:
    ref = parse_registry_ref(f"{url}/test/repo")
    return RegistryClient(ref, retry=ONE_TRY, credentials=credentials)


async def _expect_bounded_failure(server: RawServer, call: Callable[[], Awaitable[Any]]) -> str:
    started = time.monotonic()
    with pytest.raises(AssetError) as info:
        await asyncio.wait_for(call(), 30)
    assert time.monotonic() - started < 20
    # Socket buffers hold a few MiB at most: the client stopped reading early.
    assert server.sent < 32 * 1024 * 1024, f"client read {server.sent} bytes"
    return str(info.value)


async def test_endless_token_response_is_capped() -> None:
    def handler(conn: socket.socket, target: str, headers: dict[str, str], srv: RawServer) -> None:
        if target.startswith("/token"):
            endless_chunked(conn, srv, b"HTTP/1.1 200 OK\r\n", SENT_LIMIT)
            return
        body = b"{}"
        srv.send(
            conn,
            b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n"
            b'WWW-Authenticate: Bearer realm="' + srv.url.encode() + b'/token",service="s"\r\n'
            b"\r\n" + body,
        )

    with RawServer(handler) as server:
        async with _client(server.url) as client:
            message = await _expect_bounded_failure(server, lambda: client.get_manifest("v1"))
    assert "/token" in message


@pytest.mark.parametrize("status", [b"401 Unauthorized", b"302 Found", b"500 Oops"])
async def test_endless_error_or_redirect_body_is_capped(status: bytes) -> None:
    def handler(conn: socket.socket, target: str, headers: dict[str, str], srv: RawServer) -> None:
        if target.startswith("/elsewhere"):
            srv.send(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            return
        head = b"HTTP/1.1 " + status + b'\r\nWWW-Authenticate: Basic realm="r"\r\n'
        head += b"Location: /elsewhere\r\n"
        endless_chunked(conn, srv, head, SENT_LIMIT)

    with RawServer(handler) as server:
        async with _client(server.url, Credentials("u", "p")) as client:
            message = await _expect_bounded_failure(server, lambda: client.get_manifest("v1"))
    assert f"{server.url}/v2/test/repo/manifests/v1" in message


@pytest.mark.parametrize(
    "location", ["file:///etc/passwd", "ftp://127.0.0.1/x", "/v2/test/repo/manifests/v1"]
)
async def test_bad_redirects_are_errors_naming_the_url(location: str) -> None:
    def handler(conn: socket.socket, target: str, headers: dict[str, str], srv: RawServer) -> None:
        srv.send(
            conn,
            b"HTTP/1.1 302 Found\r\nContent-Length: 0\r\nLocation: "
            + location.encode()
            + b"\r\n\r\n",
        )

    with RawServer(handler) as server:
        async with _client(server.url) as client:
            with pytest.raises(AssetDownloadError) as info:
                await asyncio.wait_for(client.get_manifest("v1"), 30)
    assert f"{server.url}/v2/test/repo/manifests/v1" in str(info.value)
    assert len(server.requests) <= 21  # a loop stops at httpx's redirect limit


async def test_206_with_wrong_content_range_is_refused() -> None:
    digest = "sha256:" + "a" * 64

    def handler(conn: socket.socket, target: str, headers: dict[str, str], srv: RawServer) -> None:
        srv.send(
            conn,
            b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-9/10\r\n"
            b"Content-Length: 10\r\n\r\n0123456789",
        )

    with RawServer(handler) as server:
        async with _client(server.url) as client:
            with pytest.raises(AssetDownloadError, match="Content-Range") as info:
                async with client.open_blob(digest, 5):
                    pass
    assert digest in str(info.value)


# -- a booby-trapped OCI layout -------------------------------------------------------------------


def _in_thread(fn: Callable[[], Any], seconds: float = 10) -> Any:
    """Run `fn` in a daemon thread; fail (instead of hanging) if it blocks."""
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # handed to the test below
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"{fn} blocked")
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


@pytest.mark.parametrize("kind", ["fifo", "device-link", "dir"])
def test_layout_blob_that_is_not_a_regular_file_is_refused(tmp_path: Path, kind: str) -> None:
    from exec_sandbox_assets.base.errors import AssetNotFoundError
    from exec_sandbox_assets.oci.layout import LayoutReader
    from exec_sandbox_assets.oci.layout_writer import LayoutWriter

    data = b"some blob"
    digest = LayoutWriter(tmp_path / "layout").put_blob_bytes(data)
    blob = tmp_path / "layout" / "blobs" / "sha256" / digest.partition(":")[2]
    blob.unlink()
    if kind == "fifo":
        os.mkfifo(blob)
    elif kind == "dir":
        blob.mkdir()
    else:
        blob.symlink_to("/dev/zero")
    reader = LayoutReader.open(tmp_path / "layout")
    with pytest.raises(AssetNotFoundError, match="not a regular file") as info:
        _in_thread(lambda: reader.read_blob(digest, 1024))
    assert str(blob) in str(info.value)
    with pytest.raises(AssetNotFoundError, match="not a regular file"):
        _in_thread(lambda: reader.open_blob(digest, 0))


def test_layout_blob_symlinked_to_a_regular_file_is_read_and_verified(tmp_path: Path) -> None:
    """Allowed (operators deduplicate with links); the digest check decides, as ever."""
    from exec_sandbox_assets.base.errors import AssetChecksumError
    from exec_sandbox_assets.oci.layout import LayoutReader
    from exec_sandbox_assets.oci.layout_writer import LayoutWriter

    data = b"some blob"
    digest = LayoutWriter(tmp_path / "layout").put_blob_bytes(data)
    blob = tmp_path / "layout" / "blobs" / "sha256" / digest.partition(":")[2]
    outside = tmp_path / "outside"
    outside.write_bytes(data)
    blob.unlink()
    blob.symlink_to(outside)
    reader = LayoutReader.open(tmp_path / "layout")
    assert reader.read_blob(digest, 1024) == data
    outside.write_bytes(b"secret other content")
    with pytest.raises(AssetChecksumError):
        reader.read_blob(digest, 1024)


# -- hostile documents ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "title",
    [
        "..",
        "../vmlinuz-x86_64.zst",
        "a/b.zst",
        ".hidden.zst",
        "\uff56mlinuz-x86_64.zst",  # fullwidth v
        "vmlinuz\u2024zst",  # one dot leader, looks like "."
        "vmlinuz.zst\n",
        "a" * 120 + ".zst",  # longer than a lock or temp file name can hold
    ],
)
def test_unsafe_layer_titles_are_refused_before_any_file_access(title: str) -> None:
    from exec_sandbox_assets.base.errors import FormatError
    from exec_sandbox_assets.oci.model import Descriptor
    from exec_sandbox_assets.release import catalog
    from exec_sandbox_assets.release.documents import read_asset_layer

    desc = Descriptor(
        "application/vnd.exec-sandbox.kernel.v1+zstd",
        "sha256:" + "a" * 64,
        10,
        {
            catalog.ANN_TITLE: title,
            catalog.ANN_KIND: "kernel",
            catalog.ANN_ARCH: "x86_64",
            catalog.ANN_CONTENT_DIGEST: "sha256:" + "b" * 64,
            catalog.ANN_CONTENT_SIZE: "20",
        },
    )
    with pytest.raises(FormatError, match="title") as info:
        read_asset_layer(desc, "registry x manifest sha256:m")
    assert "registry x manifest sha256:m" in str(info.value)


NESTED = b"[" * 20_000 + b"]" * 20_000  # past the recursion limit, under every body cap


@pytest.mark.parametrize("target", ["/v2/test/repo/manifests/v1", "/token"])
async def test_deeply_nested_json_from_a_server_is_not_a_crash(target: str) -> None:
    def handler(conn: socket.socket, path: str, headers: dict[str, str], srv: RawServer) -> None:
        if target == "/token" and not path.startswith("/token"):
            challenge = b'WWW-Authenticate: Bearer realm="' + srv.url.encode() + b'/token"\r\n'
            srv.send(conn, b"HTTP/1.1 401 No\r\nContent-Length: 0\r\n" + challenge + b"\r\n")
            return
        status = b"200 OK" if path.startswith("/token") else b"404 Not Found"
        srv.send(
            conn,
            b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n%s" % (status, len(NESTED), NESTED),
        )

    with RawServer(handler) as server:
        async with _client(server.url) as client:
            with pytest.raises(AssetError):
                await asyncio.wait_for(client.get_manifest("v1"), 30)


def test_deeply_nested_layout_index_is_a_format_error(tmp_path: Path) -> None:
    from exec_sandbox_assets.base.errors import FormatError
    from exec_sandbox_assets.oci.layout import LayoutReader
    from exec_sandbox_assets.oci.layout_writer import LayoutWriter

    LayoutWriter(tmp_path / "layout")
    (tmp_path / "layout" / "index.json").write_bytes(b'{"schemaVersion":2,"x":' + NESTED + b"}")
    with pytest.raises(FormatError, match=r"index\.json"):
        LayoutReader.open(tmp_path / "layout")
    (tmp_path / "layout" / "oci-layout").write_bytes(NESTED)
    with pytest.raises(FormatError, match="oci-layout"):
        LayoutReader.open(tmp_path / "layout")


def test_deeply_nested_cache_record_is_a_miss(root: Path) -> None:
    store = Store(root)
    record = root / "v1.0" / ".verified" / "vmlinuz-x86_64.json"
    record.parent.mkdir(parents=True)
    record.write_bytes(NESTED)
    assert store.lookup("1.0", "vmlinuz-x86_64") is None
    (root / "refs").mkdir()
    (root / "refs" / "tag-latest.json").write_bytes(NESTED)
    assert store.read_state("tag-latest") is None


@pytest.mark.parametrize("threaded", [False, True], ids=["inline", "writer-thread"])
async def test_disk_full_mid_decompression_publishes_nothing_and_keeps_the_blob(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threaded: bool
) -> None:
    import errno

    from exec_sandbox_assets.base.errors import OutOfSpaceError
    from exec_sandbox_assets.cache import output

    if threaded:  # as a base image is written: by the output's own thread
        monkeypatch.setattr(output, "_THREADED_FROM", 0)

    fx = make_fixture(tmp_path, content_bytes(3 << 20))  # several 1 MiB output chunks
    store = Store(root)
    real_write = os.write
    big_writes = [0]

    def full_disk(fd: int, data: Any) -> int:
        if len(data) >= 64 * 1024:  # decompressed output chunks, not records
            big_writes[0] += 1
            if big_writes[0] > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    opener = FileOpener(fx.blob)
    with pytest.raises(OutOfSpaceError, match="blob is kept") as info:
        await store.ensure(fx.out, opener)
    monkeypatch.undo()

    assert fx.out.name in str(info.value)
    assert not store.output_path(fx.out.version, fx.out.name).exists()
    assert store.lookup(fx.out.version, fx.out.name) is None
    assert [p.name for p, _ in store.blobs()] == [fx.out.layer_digest.partition(":")[2]]
    assert store.stray_temp_files() == []
    # The next run decompresses the kept blob: no second download.
    assert (await store.ensure(fx.out, FileOpener(fx.blob, cut_at=0))).read_bytes() == fx.content


@pytest.mark.parametrize("size", ["\u00b2", "1" * 5000, "-1", "1e3", " 1"])
def test_odd_content_size_annotation_is_a_format_error(size: str) -> None:
    from exec_sandbox_assets.base.errors import FormatError
    from exec_sandbox_assets.oci.model import Descriptor
    from exec_sandbox_assets.release import catalog
    from exec_sandbox_assets.release.documents import read_asset_layer

    desc = Descriptor(
        "application/vnd.exec-sandbox.kernel.v1+zstd",
        "sha256:" + "a" * 64,
        10,
        {
            catalog.ANN_TITLE: "vmlinuz-x86_64.zst",
            catalog.ANN_KIND: "kernel",
            catalog.ANN_CONTENT_DIGEST: "sha256:" + "b" * 64,
            catalog.ANN_CONTENT_SIZE: size,
        },
    )
    with pytest.raises(FormatError, match=r"content\.size"):
        read_asset_layer(desc, "manifest m")


async def test_206_with_a_huge_content_range_number_is_refused() -> None:
    digest = "sha256:" + "a" * 64
    start = "0" * 4999 + "5"

    def handler(conn: socket.socket, target: str, headers: dict[str, str], srv: RawServer) -> None:
        srv.send(
            conn,
            b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes %s-9/10\r\n"
            b"Content-Length: 5\r\n\r\n56789" % start.encode(),
        )

    with RawServer(handler) as server:
        async with _client(server.url) as client:
            with pytest.raises(AssetDownloadError, match="Content-Range"):
                async with client.open_blob(digest, 5):
                    pass
