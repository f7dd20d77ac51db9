"""The on-disk cache: real files, real processes, real locks.

Streams come from a local file through an opener that can cut, corrupt, over-send or
slow down; crashes are real SIGKILLs of child processes.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import zstandard

from exec_sandbox_assets.base.errors import (
    AssetChecksumError,
    AssetDownloadError,
    OutOfSpaceError,
    SizeLimitError,
)
from exec_sandbox_assets.cache import store as store_mod
from exec_sandbox_assets.cache.store import FileLock, OutputSpec, Store

CHUNK = 64 * 1024
LOGGER = "exec_sandbox_assets.cache.store"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def content_bytes(size: int = 1 << 20) -> bytes:
    # Half random, half zeros: a compressed blob of many chunks that still compresses.
    half = size // 2
    return os.urandom(half) + bytes(size - half)


@dataclass(frozen=True)
class Fixture:
    blob: Path
    content: bytes
    out: OutputSpec


def make_fixture(
    tmp_path: Path,
    content: bytes | None = None,
    *,
    compressed: bool = True,
    executable: bool = False,
    version: str = "1.2.0",
    name: str = "vmlinuz-x86_64",
) -> Fixture:
    data = content_bytes() if content is None else content
    blob_bytes = zstandard.ZstdCompressor(level=3).compress(data) if compressed else data
    blob = tmp_path / f"served-{name}-{version}"
    blob.write_bytes(blob_bytes)
    out = OutputSpec(
        version=version,
        name=name,
        layer_digest=sha256(blob_bytes),
        layer_size=len(blob_bytes),
        compressed=compressed,
        content_digest=sha256(data),
        content_size=len(data),
        executable=executable,
        source=f"file://{blob}",
    )
    return Fixture(blob, data, out)


Stream = AbstractAsyncContextManager[AsyncIterator[bytes]]


class FileOpener:
    """Serves a file's bytes from an offset, with faults on demand."""

    def __init__(
        self,
        path: Path,
        *,
        cut_at: int | None = None,
        flip_at: int | None = None,
        extra: bytes = b"",
        delay: float = 0.0,
        on_chunk: Callable[[int], None] | None = None,
    ) -> None:
        self.path = path
        self.cut_at = cut_at
        self.flip_at = flip_at
        self.extra = extra
        self.delay = delay
        self.on_chunk = on_chunk
        self.offsets: list[int] = []

    def __call__(self, offset: int) -> Stream:
        self.offsets.append(offset)
        return self._open(offset)

    @asynccontextmanager
    async def _open(self, offset: int) -> AsyncIterator[AsyncIterator[bytes]]:
        yield self._chunks(offset)

    async def _chunks(self, offset: int) -> AsyncIterator[bytes]:
        data = bytearray(self.path.read_bytes() + self.extra)
        if self.flip_at is not None:
            data[self.flip_at] ^= 0xFF
        end = len(data) if self.cut_at is None else min(self.cut_at, len(data))
        for pos in range(offset, end, CHUNK):
            if self.delay:
                await asyncio.sleep(self.delay)
            yield bytes(data[pos : min(pos + CHUNK, end)])
            if self.on_chunk is not None:
                self.on_chunk(pos)


def forbidden(offset: int) -> Stream:
    raise AssertionError(f"opener called (offset {offset}) although the cache should answer")


def visible_files(store: Store, version: str) -> list[str]:
    vdir = store.version_dir(version)
    return sorted(p.name for p in vdir.iterdir()) if vdir.exists() else []


def assert_nothing_installed(store: Store, fx: Fixture) -> None:
    assert not store.output_path(fx.out.version, fx.out.name).exists()
    assert store.lookup(fx.out.version, fx.out.name) is None
    assert store.stray_temp_files() == []
    assert store.partials() == []


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "cache"


# -- cold, warm, resume -----------------------------------------------------------------------


async def test_cold_ensure_installs_byte_exact_output_and_record(
    root: Path, tmp_path: Path
) -> None:
    fx = make_fixture(tmp_path)
    store = Store(root)
    opener = FileOpener(fx.blob)
    seen: list[int] = []

    path = await store.ensure(fx.out, opener, seen.append)

    assert path == root / "v1.2.0" / "vmlinuz-x86_64"
    assert path.read_bytes() == fx.content
    assert opener.offsets == [0]
    assert sum(seen) == fx.out.layer_size
    assert path.stat().st_mode & 0o777 == 0o644
    record = json.loads((root / "v1.2.0" / ".verified" / "vmlinuz-x86_64.json").read_text())
    st = path.stat()
    assert record["content_digest"] == fx.out.content_digest
    assert record["layer_digest"] == fx.out.layer_digest
    assert (record["size"], record["mtime_ns"], record["ino"]) == (
        st.st_size,
        st.st_mtime_ns,
        st.st_ino,
    )
    assert record["source"] == fx.out.source
    # The transient blob is gone; nothing is left half-written.
    assert store.blobs() == []
    assert store.stray_temp_files() == []
    assert visible_files(store, "1.2.0") == [".verified", "vmlinuz-x86_64"]


async def test_warm_path_answers_without_the_opener(root: Path, tmp_path: Path) -> None:
    fx = make_fixture(tmp_path)
    await Store(root).ensure(fx.out, FileOpener(fx.blob))

    store = Store(root)  # a fresh process would start from nothing but the disk
    path = store.lookup("1.2.0", "vmlinuz-x86_64")
    assert path is not None and path.read_bytes() == fx.content
    assert store.lookup("1.2.0", "vmlinuz-x86_64", content_digest=fx.out.content_digest) == path
    assert store.lookup("1.2.0", "vmlinuz-x86_64", content_digest=sha256(b"other")) is None
    assert await store.ensure(fx.out, forbidden) == path


async def test_cut_download_keeps_partial_and_resumes_from_it(root: Path, tmp_path: Path) -> None:
    fx = make_fixture(tmp_path)
    store = Store(root)
    half = (fx.out.layer_size // 2) // CHUNK * CHUNK

    with pytest.raises(AssetDownloadError, match=f"got {half} of {fx.out.layer_size}"):
        await store.ensure(fx.out, FileOpener(fx.blob, cut_at=half))
    assert [size for _, size in store.partials()] == [half]
    assert not store.output_path("1.2.0", "vmlinuz-x86_64").exists()

    opener = FileOpener(fx.blob)
    seen: list[int] = []
    path = await store.ensure(fx.out, opener, seen.append)
    assert opener.offsets == [half]
    assert seen[0] == half and sum(seen) == fx.out.layer_size
    assert path.read_bytes() == fx.content
    assert store.partials() == []


async def test_resume_over_bad_bytes_restarts_from_zero(root: Path, tmp_path: Path) -> None:
    fx = make_fixture(tmp_path)
    store = Store(root)
    partial = root / "blobs" / "sha256" / (fx.out.layer_digest.split(":")[1] + ".partial")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\0" * 3 * CHUNK)  # e.g. left by a power loss or another source

    opener = FileOpener(fx.blob)
    path = await store.ensure(fx.out, opener)
    assert opener.offsets == [3 * CHUNK, 0]
    assert path.read_bytes() == fx.content


async def test_partial_longer_than_blob_is_discarded(root: Path, tmp_path: Path) -> None:
    fx = make_fixture(tmp_path)
    store = Store(root)
    partial = root / "blobs" / "sha256" / (fx.out.layer_digest.split(":")[1] + ".partial")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"x" * (fx.out.layer_size + 1))

    opener = FileOpener(fx.blob)
    assert (await store.ensure(fx.out, opener)).read_bytes() == fx.content
    assert opener.offsets == [0]


async def test_leftover_complete_blob_is_rehashed_and_reused(root: Path, tmp_path: Path) -> None:
    fx = make_fixture(tmp_path)
    store = Store(root)
    blob = root / "blobs" / "sha256" / fx.out.layer_digest.split(":")[1]
    blob.parent.mkdir(parents=True)
    blob.write_bytes(fx.blob.read_bytes())  # a crash after the download, before the install

    assert (await store.ensure(fx.out, forbidden)).read_bytes() == fx.content
    assert store.blobs() == []


async def test_leftover_corrupt_blob_is_discarded(root: Path, tmp_path: Path) -> None:
    fx = make_fixture(tmp_path)
    store = Store(root)
    blob = root / "blobs" / "sha256" / fx.out.layer_digest.split(":")[1]
    blob.parent.mkdir(parents=True)
    data = bytearray(fx.blob.read_bytes())
    data[100] ^= 1
    blob.write_bytes(bytes(data))

    opener = FileOpener(fx.blob)
    assert (await store.ensure(fx.out, opener)).read_bytes() == fx.content
    assert opener.offsets == [0]


async def test_file_without_record_is_reinstalled(root: Path, tmp_path: Path) -> None:
    """A crash between the rename and the record: the file is never trusted."""
    fx = make_fixture(tmp_path)
    store = Store(root)
    final = store.output_path("1.2.0", "vmlinuz-x86_64")
    final.parent.mkdir(parents=True)
    final.write_bytes(b"not verified by anyone")

    assert store.lookup("1.2.0", "vmlinuz-x86_64") is None
    opener = FileOpener(fx.blob)
    assert (await store.ensure(fx.out, opener)).read_bytes() == fx.content
    assert opener.offsets == [0]


# -- verification failures: nothing appears under the final name ------------------------------


async def test_corrupt_blob_is_refused_and_dropped(root: Path, tmp_path: Path) -> None:
    fx = make_fixture(tmp_path)
    store = Store(root)
    with pytest.raises(AssetChecksumError, match="file://") as info:
        await store.ensure(fx.out, FileOpener(fx.blob, flip_at=fx.out.layer_size // 3))
    assert info.value.expected == fx.out.layer_digest
    assert_nothing_installed(store, fx)
    assert store.blobs() == []


async def test_source_sending_too_much_is_refused(root: Path, tmp_path: Path) -> None:
    fx = make_fixture(tmp_path)
    store = Store(root)
    with pytest.raises(SizeLimitError, match="sent more than"):
        await store.ensure(fx.out, FileOpener(fx.blob, extra=b"trailing junk"))
    assert_nothing_installed(store, fx)


async def test_lying_content_size_is_refused(root: Path, tmp_path: Path) -> None:
    fx = make_fixture(tmp_path)
    store = Store(root)
    out = replace(fx.out, content_size=fx.out.content_size - 1)
    with pytest.raises(SizeLimitError, match="exceeds its declared size"):
        await store.ensure(out, FileOpener(fx.blob))
    assert_nothing_installed(store, fx)
    assert store.blobs() == []


async def test_declared_size_larger_than_content_is_refused(root: Path, tmp_path: Path) -> None:
    fx = make_fixture(tmp_path)
    store = Store(root)
    out = replace(fx.out, content_size=fx.out.content_size + 1)
    with pytest.raises(AssetChecksumError, match="size of decompressed"):
        await store.ensure(out, FileOpener(fx.blob))
    assert_nothing_installed(store, fx)


async def test_decompression_bomb_stops_at_the_declared_size(root: Path, tmp_path: Path) -> None:
    # 256 concatenated frames of 16 MiB of zeros: ~4 GiB out of a blob of a few hundred KB.
    frame = zstandard.ZstdCompressor(level=3).compress(bytes(16 << 20))
    blob_bytes = frame * 256
    blob = tmp_path / "bomb.zst"
    blob.write_bytes(blob_bytes)
    out = OutputSpec(
        version="1.2.0",
        name="initramfs-x86_64",
        layer_digest=sha256(blob_bytes),
        layer_size=len(blob_bytes),
        compressed=True,
        content_digest=sha256(bytes(1 << 20)),
        content_size=1 << 20,
        executable=False,
        source="bomb",
    )
    store = Store(root)
    started = time.monotonic()
    with pytest.raises(SizeLimitError, match="stopped"):
        await store.ensure(out, FileOpener(blob))
    assert time.monotonic() - started < 5  # writing 4 GiB would take far longer
    assert not store.output_path("1.2.0", "initramfs-x86_64").exists()
    assert store.stray_temp_files() == []


async def test_multi_frame_blob_decompresses_fully(root: Path, tmp_path: Path) -> None:
    parts = [os.urandom(300_000), bytes(500_000), os.urandom(200_000)]
    cctx = zstandard.ZstdCompressor(level=3)
    blob_bytes = b"".join(cctx.compress(p) for p in parts)
    fx = make_fixture(tmp_path, compressed=False)  # for the paths only
    blob = tmp_path / "frames.zst"
    blob.write_bytes(blob_bytes)
    content = b"".join(parts)
    out = replace(
        fx.out,
        compressed=True,
        layer_digest=sha256(blob_bytes),
        layer_size=len(blob_bytes),
        content_digest=sha256(content),
        content_size=len(content),
    )
    assert (await Store(root).ensure(out, FileOpener(blob))).read_bytes() == content


@pytest.mark.parametrize("compressed", [True, False])
async def test_wrong_content_digest_is_refused(
    root: Path, tmp_path: Path, compressed: bool
) -> None:
    fx = make_fixture(tmp_path, compressed=compressed)
    store = Store(root)
    out = replace(fx.out, content_digest=sha256(b"something else"))
    with pytest.raises(AssetChecksumError) as info:
        await store.ensure(out, FileOpener(fx.blob))
    assert info.value.expected == out.content_digest
    assert info.value.actual == fx.out.content_digest
    assert_nothing_installed(store, fx)
    assert store.blobs() == []


async def test_undecodable_zstd_is_refused(root: Path, tmp_path: Path) -> None:
    junk = b"\x28\xb5\x2f\xfd" + os.urandom(5000)  # zstd magic, then garbage
    blob = tmp_path / "junk.zst"
    blob.write_bytes(junk)
    fx = make_fixture(tmp_path)
    out = replace(fx.out, layer_digest=sha256(junk), layer_size=len(junk))
    store = Store(root)
    with pytest.raises(AssetChecksumError, match="undecodable zstd"):
        await store.ensure(out, FileOpener(blob))
    assert_nothing_installed(store, fx)


# -- the warm path's stat check ----------------------------------------------------------------


async def test_changed_output_is_not_trusted(root: Path, tmp_path: Path) -> None:
    fx = make_fixture(tmp_path)
    store = Store(root)
    path = await store.ensure(fx.out, FileOpener(fx.blob))
    st = path.stat()

    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert store.lookup("1.2.0", "vmlinuz-x86_64") is None
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert store.lookup("1.2.0", "vmlinuz-x86_64") == path

    with path.open("ab") as f:
        f.write(b"x")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert store.lookup("1.2.0", "vmlinuz-x86_64") is None  # size differs

    copy = path.with_name("copy")
    copy.write_bytes(fx.content)
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    copy.replace(path)
    assert store.lookup("1.2.0", "vmlinuz-x86_64") is None  # same size and mtime, new inode

    opener = FileOpener(fx.blob)
    assert (await store.ensure(fx.out, opener)).read_bytes() == fx.content
    assert opener.offsets == [0]
    assert store.lookup("1.2.0", "vmlinuz-x86_64") == path


async def test_lookup_never_raises_on_bad_records(root: Path, tmp_path: Path) -> None:
    fx = make_fixture(tmp_path)
    store = Store(root)
    assert store.lookup("1.2.0", "vmlinuz-x86_64") is None  # nothing at all
    await store.ensure(fx.out, FileOpener(fx.blob))
    record = root / "v1.2.0" / ".verified" / "vmlinuz-x86_64.json"
    good = record.read_bytes()
    for bad in (b"{not json", b"\xff\xfe", b"[]", good.replace(b'"ino"', b'"inode"')):
        record.write_bytes(bad)
        assert store.lookup("1.2.0", "vmlinuz-x86_64") is None
    assert store.lookup("../../etc", "passwd") is None  # a corrupt ref, not a crash


async def test_uncompressed_executable_is_moved_into_place(root: Path, tmp_path: Path) -> None:
    fx = make_fixture(
        tmp_path, os.urandom(300_000), compressed=False, executable=True, name="gvproxy-wrapper"
    )
    store = Store(root)
    path = await store.ensure(fx.out, FileOpener(fx.blob))
    assert path.read_bytes() == fx.content
    assert path.stat().st_mode & 0o777 == 0o755
    assert store.blobs() == [] and store.partials() == []
    assert store.lookup("1.2.0", "gvproxy-wrapper") == path


# -- failures mid-way ----------------------------------------------------------------------------


async def test_out_of_space_keeps_the_partial(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fx = make_fixture(tmp_path)
    store = Store(root)
    real_pwrite = os.pwrite
    calls = [0]

    def full_disk(fd: int, data: Any, offset: int) -> int:
        if len(data) >= CHUNK:  # not the lock files' pid notes
            calls[0] += 1
        if calls[0] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full_disk)
    with pytest.raises(OutOfSpaceError, match="partial kept"):
        await store.ensure(fx.out, FileOpener(fx.blob))
    monkeypatch.undo()

    assert [size for _, size in store.partials()] == [3 * CHUNK]
    opener = FileOpener(fx.blob)
    assert (await store.ensure(fx.out, opener)).read_bytes() == fx.content
    assert opener.offsets == [3 * CHUNK]


async def test_cancellation_keeps_partial_and_releases_the_lock(
    root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fx = make_fixture(tmp_path)
    store = Store(root)
    reached = asyncio.Event()

    def note(pos: int) -> None:
        if pos >= 4 * CHUNK:
            reached.set()

    task = asyncio.create_task(store.ensure(fx.out, FileOpener(fx.blob, delay=0.01, on_chunk=note)))
    await asyncio.wait_for(reached.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    [(_, size)] = store.partials()
    assert size >= 4 * CHUNK
    assert not store.output_path("1.2.0", "vmlinuz-x86_64").exists()
    caplog.set_level(logging.INFO, logger=LOGGER)
    opener = FileOpener(fx.blob)
    # A short lock timeout: a lock the cancelled task kept would be waited for, then
    # given up on, and either shows in the log (no wall-clock bound needed).
    again = Store(root, lock_timeout=2)
    assert (await again.ensure(fx.out, opener)).read_bytes() == fx.content
    assert opener.offsets == [size]
    assert lock_waits(caplog) == []  # the lock was released, nobody waited


@pytest.mark.parametrize("compressed", [True, False])
async def test_partial_swapped_under_the_writer_is_not_published(
    root: Path, tmp_path: Path, compressed: bool
) -> None:
    """Without working locks another writer may delete our partial. A compressed output is
    decompressed from the bytes we hashed ourselves, so it is still exact; an uncompressed
    one would be the partial itself, which is no longer ours: we start over."""
    fx = make_fixture(tmp_path, compressed=compressed)
    store = Store(root)
    partial = root / "blobs" / "sha256" / (fx.out.layer_digest.split(":")[1] + ".partial")
    done = [False]

    def sabotage(pos: int) -> None:
        if not done[0] and pos >= 2 * CHUNK:
            done[0] = True
            partial.unlink()

    opener = FileOpener(fx.blob, on_chunk=sabotage)
    path = await store.ensure(fx.out, opener)
    assert path.read_bytes() == fx.content
    assert store.lookup(fx.out.version, fx.out.name) == path
    assert opener.offsets == ([0] if compressed else [0, 0])
    assert store.stray_temp_files() == []


# -- other processes -----------------------------------------------------------------------------

CHILD = """
import asyncio, hashlib, json, os, sys
from contextlib import asynccontextmanager
from pathlib import Path
from exec_sandbox_assets.cache.store import OutputSpec, Store

cfg = json.loads(sys.argv[1])
out = OutputSpec(**cfg["out"])
blob = Path(cfg["blob"]).read_bytes()

@asynccontextmanager
async def opener(offset):
    if cfg.get("count_file"):
        with open(cfg["count_file"], "a") as f:
            f.write(f"{os.getpid()} {offset}\\n")
    async def chunks():
        for pos in range(offset, len(blob), cfg["chunk"]):
            await asyncio.sleep(cfg["delay"])
            yield blob[pos:pos + cfg["chunk"]]
    yield chunks()

async def main():
    if cfg.get("go_file"):
        Path(cfg["go_file"] + f".ready-{os.getpid()}").touch()
        while not os.path.exists(cfg["go_file"]):
            await asyncio.sleep(0.005)
    if cfg.get("no_locks"):  # a file system without flock (NFS): a fault we cannot make here
        import errno, fcntl
        def no_locks(fd, op):
            raise OSError(errno.ENOLCK, "No locks available")
        fcntl.flock = no_locks
    store = Store(Path(cfg["root"]), lock_timeout=cfg.get("lock_timeout", 60.0))
    path = await store.ensure(out, opener)
    data = path.read_bytes()
    print(json.dumps({"path": str(path), "sha": hashlib.sha256(data).hexdigest()}))

asyncio.run(main())
"""


def lock_waits(caplog: pytest.LogCaptureFixture) -> list[tuple[str, Path]]:
    """("waiting" | "gave up", lock path) for each lock wait the store logged."""
    out = []
    for record in caplog.records:
        message = record.getMessage()
        for kind, prefix in (("waiting", "waiting for lock "), ("gave up", "gave up waiting")):
            if message.startswith(prefix):
                assert isinstance(record.args, tuple), record.args
                out.append((kind, Path(str(record.args[0]))))
    return out


def child_cmd(tmp_path: Path, fx: Fixture, root: Path, **cfg: Any) -> list[str]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    full = {"out": fx.out.__dict__, "blob": str(fx.blob), "root": str(root), "chunk": CHUNK}
    full.update({"delay": 0.0, **cfg})
    return [sys.executable, str(script), json.dumps(full)]


@contextmanager
def lock_holder(path: Path, seconds: float) -> Iterator[subprocess.Popen[str]]:
    """Another process holding `path` locked for `seconds`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    code = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(float(sys.argv[2]))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(path), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait()


async def test_same_process_tasks_share_one_download(root: Path, tmp_path: Path) -> None:
    """Waiting for the lock polls: a blocked event loop would deadlock this test."""
    fx = make_fixture(tmp_path)
    store = Store(root)
    opener = FileOpener(fx.blob, delay=0.01)
    paths = await asyncio.wait_for(
        asyncio.gather(*(store.ensure(fx.out, opener) for _ in range(3))), 20
    )
    assert len(set(paths)) == 1 and paths[0].read_bytes() == fx.content
    assert opener.offsets == [0]


async def test_sigkill_mid_download_resumes(
    root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fx = make_fixture(tmp_path, content_bytes(2 << 20))
    store = Store(root)
    proc = subprocess.Popen(child_cmd(tmp_path, fx, root, delay=0.02))
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if any(size >= 6 * CHUNK for _, size in store.partials()):
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("the child never got going")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert store.lookup("1.2.0", "vmlinuz-x86_64") is None
    assert not store.output_path("1.2.0", "vmlinuz-x86_64").exists()
    [(_, size)] = store.partials()

    caplog.set_level(logging.INFO, logger=LOGGER)
    opener = FileOpener(fx.blob)
    path = await Store(root, lock_timeout=5).ensure(fx.out, opener)
    assert lock_waits(caplog) == []  # the dead child's lock went with it
    assert opener.offsets == [size] and size > 0
    assert path.read_bytes() == fx.content


def run_together(cmd: list[str], go: Path, n: int) -> list[tuple[int, str, str]]:
    """Start `n` children, release them at once; (returncode, stdout, stderr) each."""
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(n)
    ]
    try:
        deadline = time.monotonic() + 20
        while len(list(go.parent.glob(f"{go.name}.ready-*"))) < n:
            assert time.monotonic() < deadline, "children did not start"
            time.sleep(0.01)
        go.touch()
        results = [proc.communicate(timeout=60) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, results, strict=True)]


async def test_six_processes_download_once(root: Path, tmp_path: Path) -> None:
    fx = make_fixture(tmp_path)
    count = tmp_path / "opened"
    go = tmp_path / "go"
    cmd = child_cmd(
        tmp_path, fx, root, delay=0.05, count_file=str(count), go_file=str(go)
    )  # ~0.4 s of download: everyone else is waiting on the lock meanwhile
    results = await asyncio.to_thread(run_together, cmd, go, 6)
    assert [rc for rc, _, _ in results] == [0] * 6, [err for _, _, err in results]
    answers = [json.loads(stdout) for _, stdout, _ in results]
    assert {a["path"] for a in answers} == {str(root / "v1.2.0" / "vmlinuz-x86_64")}
    assert {a["sha"] for a in answers} == {fx.out.content_digest.split(":")[1]}
    opened = count.read_text().splitlines()  # "pid offset" per opener call
    assert len(opened) == 1 and opened[0].endswith(" 0"), opened
    assert Store(root).stray_temp_files() == []


async def test_eight_processes_without_working_locks_all_get_the_verified_file(
    root: Path, tmp_path: Path
) -> None:
    """Correctness never depends on the lock: with flock failing (as on some NFS mounts)
    writers may download twice and race, but every one ends with the verified file."""
    fx = make_fixture(tmp_path)
    go = tmp_path / "go"
    cmd = child_cmd(tmp_path, fx, root, delay=0.01, go_file=str(go), no_locks=True)
    results = await asyncio.to_thread(run_together, cmd, go, 8)
    assert [rc for rc, _, _ in results] == [0] * 8, [err for _, _, err in results]
    answers = [json.loads(stdout) for _, stdout, _ in results]
    assert {a["sha"] for a in answers} == {fx.out.content_digest.split(":")[1]}
    assert Store(root).lookup("1.2.0", "vmlinuz-x86_64") is not None
    assert Store(root).stray_temp_files() == []


async def test_lock_timeout_falls_back_to_an_unlocked_verified_install(
    root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    fx = make_fixture(tmp_path)
    store = Store(root, lock_timeout=0.5)
    out_lock = store.output_lock("1.2.0", "vmlinuz-x86_64").path
    blob_lock = store.blob_lock(fx.out.layer_digest).path
    with lock_holder(out_lock, 60), lock_holder(blob_lock, 60):
        path = await store.ensure(fx.out, FileOpener(fx.blob))
        assert path.read_bytes() == fx.content
    # One deadline for both locks: the output lock is waited for until it runs out; the
    # blob lock is then tried once, not waited for all over again.
    assert lock_waits(caplog) == [
        ("waiting", out_lock),
        ("gave up", out_lock),
        ("gave up", blob_lock),
    ]
    assert store.lookup("1.2.0", "vmlinuz-x86_64") == path
    assert any(
        r.levelno == logging.WARNING and "gave up waiting" in r.getMessage() for r in caplog.records
    )


async def test_file_lock_waits_logs_once_and_acquires(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    path = tmp_path / "locks" / "x.lock"
    with lock_holder(path, 0.5):
        lock = FileLock(path, timeout=20)
        started = time.monotonic()
        async with lock:
            assert lock.locked
            assert time.monotonic() - started > 0.2
    assert not lock.locked
    waits = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(waits) == 1 and str(path) in waits[0].getMessage()


async def test_unsupported_locking_proceeds_unlocked(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    fx = make_fixture(tmp_path)
    lock = FileLock(root / "locks" / "y.lock", timeout=10)
    assert await lock.acquire() is False
    assert (await Store(root).ensure(fx.out, FileOpener(fx.blob))).read_bytes() == fx.content


# -- refs and introspection ------------------------------------------------------------------


def test_state_roundtrip_and_corruption(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = Store(root)
    assert store.read_state("tag-latest") is None
    store.write_state("tag-latest", {"version": "1.2.0"})
    assert store.read_state("tag-latest") == {"version": "1.2.0"}
    store.write_state("tag-latest", {"version": "1.3.0"})
    assert store.read_state("tag-latest") == {"version": "1.3.0"}
    assert [p.name for p in (root / "refs").iterdir()] == ["tag-latest.json"]

    (root / "refs" / "tag-latest.json").write_text("{truncated")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.read_state("tag-latest") is None
    assert "corrupt" in caplog.text
    for bad in ("", "../x", "a/b", ".hidden", "x" * 300, "a\nb"):
        with pytest.raises(ValueError):
            store.write_state(bad, {})


async def test_introspection(root: Path, tmp_path: Path) -> None:
    store = Store(root)
    assert store.versions() == [] and store.partials() == []
    a = make_fixture(tmp_path, version="1.10.0")
    b = make_fixture(tmp_path, version="1.9.0")
    await store.ensure(a.out, FileOpener(a.blob))
    await store.ensure(b.out, FileOpener(b.blob))
    c = make_fixture(tmp_path, version="1.9.0", name="initramfs-x86_64")
    with pytest.raises(AssetDownloadError):
        await store.ensure(c.out, FileOpener(c.blob, cut_at=CHUNK))
    stray = store.version_dir("1.9.0") / ".vmlinuz-x86_64.tmp-1-dead"
    stray.write_bytes(b"left by a crash")

    assert store.versions() == ["1.9.0", "1.10.0"]
    [info] = store.outputs("1.9.0")
    assert (info.name, info.valid, info.content_digest) == (
        "vmlinuz-x86_64",
        True,
        b.out.content_digest,
    )
    assert info.size == len(b.content) and info.source == b.out.source and info.verified_at
    [(partial, size)] = store.partials()
    assert size == CHUNK
    assert sorted(store.stray_temp_files()) == sorted([stray, partial])
    assert store.verify_full("1.9.0") == [("vmlinuz-x86_64", True)]

    # In-place damage that keeps size and mtime fools the stat check, not verify_full.
    path = info.path
    st = path.stat()
    with path.open("r+b") as f:
        f.seek(10)
        byte = f.read(1)
        f.seek(10)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert store.lookup("1.9.0", "vmlinuz-x86_64") == path
    assert store.verify_full("1.9.0") == [("vmlinuz-x86_64", False)]

    # A dead writer's temp file goes when the output is next installed (under its lock).
    assert (await store.ensure(c.out, FileOpener(c.blob))).read_bytes() == c.content
    path.unlink()
    await store.ensure(b.out, FileOpener(b.blob))
    assert store.stray_temp_files() == []
    assert store.verify_full("1.9.0") == [("initramfs-x86_64", True), ("vmlinuz-x86_64", True)]

    path.unlink()
    assert [(i.name, i.valid) for i in store.outputs("1.9.0")] == [
        ("initramfs-x86_64", True),
        ("vmlinuz-x86_64", False),
    ]
    assert store.verify_full("1.9.0") == [("initramfs-x86_64", True), ("vmlinuz-x86_64", False)]


def test_store_module_imports_nothing_heavy() -> None:
    """It is on the scheduler's boot path: stdlib only until a compressed install."""
    code = (
        "import json, sys, types\n"
        # Bypass the package __init__ (what it imports is not this module's doing).
        "pkg = types.ModuleType('exec_sandbox_assets')\n"
        "pkg.__path__ = [sys.argv[1]]\n"
        "sys.modules['exec_sandbox_assets'] = pkg\n"
        "import exec_sandbox_assets.cache.store\n"
        "ours = sorted(m for m in sys.modules if m.startswith('exec_sandbox_assets'))\n"
        "heavy = {'zstandard', 'httpx', 'cryptography', 'oras', 'requests', 'platformdirs', 'sigstore'}\n"
        "print(json.dumps([ours, sorted(heavy & set(sys.modules))]))\n"
    )
    src = str(Path(store_mod.__file__).parent.parent)  # the package dir
    out = subprocess.run(
        [sys.executable, "-c", code, src], capture_output=True, text=True, check=True
    ).stdout
    ours, heavy = json.loads(out)
    assert heavy == []
    assert ours == [
        "exec_sandbox_assets",
        "exec_sandbox_assets.base",  # a docstring only
        "exec_sandbox_assets.base.errors",
        "exec_sandbox_assets.base.fsutil",
        "exec_sandbox_assets.base.safejson",  # stdlib only: the parser of untrusted JSON
        "exec_sandbox_assets.base.safetext",
        "exec_sandbox_assets.cache",
        "exec_sandbox_assets.cache.content",
        "exec_sandbox_assets.cache.download",
        "exec_sandbox_assets.cache.files",
        "exec_sandbox_assets.cache.gate",  # stdlib only: the signature gate
        "exec_sandbox_assets.cache.install",
        "exec_sandbox_assets.cache.listing",
        "exec_sandbox_assets.cache.locks",
        "exec_sandbox_assets.cache.output",
        "exec_sandbox_assets.cache.records",
        "exec_sandbox_assets.cache.refs",
        "exec_sandbox_assets.cache.store",
        "exec_sandbox_assets.oci",
        "exec_sandbox_assets.oci.model",
        "exec_sandbox_assets.release",  # a docstring only
        "exec_sandbox_assets.release.catalog",  # names and their limits, stdlib only
    ]
