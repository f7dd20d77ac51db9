"""The cache's streaming pipeline, its trust records, its errors and its file modes.

Real files, real child processes (for the umask and a non-root user); streams come from
local files through openers that can cut or slow down.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import zstandard

from exec_sandbox_assets.base.errors import (
    AssetChecksumError,
    AssetDownloadError,
    AssetError,
    CacheError,
)
from exec_sandbox_assets.cache import download
from exec_sandbox_assets.cache.store import BlobRequest, CacheTrust, Store
from exec_sandbox_assets.release import keys
from exec_sandbox_assets.release.chunks import MIN_CHUNK_SIZE, ChunkDigests
from exec_sandbox_assets.release.keyid import key_id_from_pem, key_ids_of_files
from test_store import (
    CHUNK,
    FileOpener,
    assert_nothing_installed,
    content_bytes,
    make_fixture,
    sha256,
)

# -- streaming: holes, ranges, resume ----------------------------------------------------------


async def test_zero_runs_of_the_output_are_holes(root: Path, tmp_path: Path) -> None:
    content = os.urandom(300_000) + bytes(8 << 20) + os.urandom(200_000) + bytes(1 << 20)
    fx = make_fixture(tmp_path, content)
    path = await Store(root).ensure(fx.out, FileOpener(fx.blob))
    assert path.read_bytes() == content
    st = path.stat()
    assert st.st_size == len(content)
    assert st.st_blocks * 512 < 2 << 20  # the 9 MiB of zeros take no blocks


class RangeOpener(FileOpener):
    """Serves at most `per_call` bytes per call, then breaks off (as a flaky link does)."""

    def __init__(self, path: Path, per_call: int | None = None, **kw: Any) -> None:
        super().__init__(path, **kw)
        self.per_call = per_call
        self.served = 0

    async def _chunks(self, offset: int) -> AsyncIterator[bytes]:
        sent = 0
        async for chunk in super()._chunks(offset):
            if self.per_call is not None and sent >= self.per_call:
                raise AssetDownloadError(f"broke off at {offset + sent}")
            self.served += len(chunk)
            sent += len(chunk)
            yield chunk


@pytest.fixture
def small_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    # Ranges of 128 KiB, so a test blob of a few MiB is fetched over several connections.
    monkeypatch.setattr(download, "RANGE_PART", 128 * 1024)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def random_fixture(tmp_path: Path, size: int = 2 << 20) -> Any:
    return make_fixture(tmp_path, os.urandom(size))  # incompressible: blob ~ size


async def test_large_blob_comes_over_parallel_ranges(
    root: Path, tmp_path: Path, small_ranges: None
) -> None:
    fx = random_fixture(tmp_path)
    opener = RangeOpener(fx.blob)
    path = await Store(root).ensure(fx.out, opener)
    assert path.read_bytes() == fx.content
    size, n = fx.out.layer_size, download.MAX_RANGES
    assert sorted(opener.offsets) == [size * i // n for i in range(n)]
    # Every byte once: a range stops at its end (the chunk it was in when it got there is
    # all a stream sends beyond it).
    assert size <= opener.served <= size + n * CHUNK
    assert Store(root).stray_temp_files() == []


async def test_every_range_resumes_where_it_broke_off(
    root: Path, tmp_path: Path, small_ranges: None
) -> None:
    fx = random_fixture(tmp_path, 1 << 20)
    opener = RangeOpener(fx.blob, per_call=2 * CHUNK)
    path = await Store(root).ensure(fx.out, opener, resumes=8)
    assert path.read_bytes() == fx.content
    assert opener.served <= fx.out.layer_size + len(opener.offsets) * CHUNK
    assert len(opener.offsets) > 4  # each range was reopened, at its new offset


async def test_interrupted_ranged_download_resumes_every_range(
    root: Path, tmp_path: Path, small_ranges: None
) -> None:
    # 8 MiB: the allowance below (3 chunks for each of up to 8 ranges) stays well under
    # the half a resume that threw the partial away would fetch again.
    fx = random_fixture(tmp_path, 8 << 20)
    half = fx.out.layer_size // 2
    first = RangeOpener(fx.blob, delay=0.005)
    task = asyncio.create_task(Store(root).ensure(fx.out, first))
    while first.served < half:
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    got = first.served
    assert got < fx.out.layer_size

    again = RangeOpener(fx.blob)
    path = await Store(root).ensure(fx.out, again)
    assert path.read_bytes() == fx.content
    # What the first run wrote is kept: only the rest comes again. Per range, "served"
    # also counts a chunk in flight when cancelled and the chunk read past its end, in
    # each run: at most 3 chunks per range beyond the bytes still missing. (The ranges
    # are counted, not assumed: this bound said 4 ranges after blobs got 8, and failed
    # one run in five or so.)
    ranges = len(first.offsets)
    assert ranges >= 4, first.offsets
    assert again.served <= fx.out.layer_size - got + 3 * ranges * CHUNK, (ranges, again.served)


async def test_a_slow_stream_is_split_by_its_measured_rate_and_resumes(
    root: Path, tmp_path: Path
) -> None:
    """A blob too small for ranges by size, coming slowly over one stream, gains a second
    one from its measured rate (issue 18); the split is in the `.ranges` file, so an
    interrupted download still resumes every range where it stopped."""
    fx = random_fixture(tmp_path, 12 << 20)
    size = fx.out.layer_size
    assert size < 2 * download.RANGE_PART  # one range by the size rule
    first = RangeOpener(fx.blob, delay=0.01)
    task = asyncio.create_task(Store(root).ensure(fx.out, first))
    while first.served < size // 2 and not task.done():
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert first.offsets[0] == 0 and len(first.offsets) >= 2, first.offsets
    got = first.served

    again = RangeOpener(fx.blob)
    path = await Store(root).ensure(fx.out, again)
    assert path.read_bytes() == fx.content
    assert again.served <= size - got + 3 * len(again.offsets) * CHUNK


class SharedRateOpener(RangeOpener):
    """Every stream takes turns (one lock): the source's total rate, not a connection's,
    is the bottleneck, so another stream cannot make the blob come faster."""

    def __init__(self, path: Path, delay: float) -> None:
        super().__init__(path)
        self.turn = asyncio.Lock()
        self.pause = delay

    async def _chunks(self, offset: int) -> AsyncIterator[bytes]:
        async for chunk in super()._chunks(offset):
            async with self.turn:
                await asyncio.sleep(self.pause)
            yield chunk


async def test_splitting_stops_when_another_stream_brings_nothing(
    root: Path, tmp_path: Path
) -> None:
    fx = random_fixture(tmp_path, 24 << 20)  # halves big enough to split again
    opener = SharedRateOpener(fx.blob, delay=0.004)
    path = await Store(root).ensure(fx.out, opener)
    assert path.read_bytes() == fx.content
    assert len(opener.offsets) == 2, opener.offsets  # one split tried, then no more


async def test_a_source_ignoring_range_costs_one_stream(
    root: Path, tmp_path: Path, small_ranges: None
) -> None:
    """A range whose first byte never comes (the server sends the blob from 0 and the
    source skips it) is taken over by the range before it."""
    fx = random_fixture(tmp_path)

    class Stalling(RangeOpener):
        async def _chunks(self, offset: int) -> AsyncIterator[bytes]:
            if offset:
                await asyncio.sleep(3600)
            async for chunk in super()._chunks(offset):
                yield chunk

    opener = Stalling(fx.blob)
    path = await asyncio.wait_for(Store(root).ensure(fx.out, opener), 60)
    assert path.read_bytes() == fx.content
    # Taken over, not fetched twice: at most one chunk in flight per range beyond the blob.
    assert opener.served <= fx.out.layer_size + 4 * CHUNK


async def test_a_frame_wider_than_its_content_is_decompressed_after_verification(
    root: Path, tmp_path: Path
) -> None:
    """A window larger than the signed content size is not granted to unverified bytes;
    the blob is verified first, then decompressed with the publisher's window."""
    content = os.urandom(100_000)
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=27)
    # Streamed: no content size in the frame header, so the window stays 128 MiB.
    with zstandard.ZstdCompressor(compression_params=params).stream_writer(
        (tmp_path / "w.zst").open("wb")
    ) as w:
        w.write(content)
    blob_bytes = (tmp_path / "w.zst").read_bytes()
    fx = make_fixture(tmp_path, content)
    blob = tmp_path / "wide.zst"
    blob.write_bytes(blob_bytes)
    out = replace(fx.out, layer_digest=sha256(blob_bytes), layer_size=len(blob_bytes))
    path = await Store(root).ensure(out, FileOpener(blob))
    assert path.read_bytes() == content


async def test_no_byte_reaches_the_decoder_before_the_layer_digest_matches(
    root: Path, tmp_path: Path
) -> None:
    """A bomb served under another blob's digest: the layer check refuses it before any
    decompression (docs/format.md §4), so the error is the layer mismatch, not the
    output cap that decompressing it would have hit first."""
    fx = make_fixture(tmp_path)
    bomb = zstandard.ZstdCompressor(level=3).compress(b"\0" * (fx.out.content_size * 50))
    path = tmp_path / "bomb.zst"
    path.write_bytes(bomb)
    out = replace(fx.out, layer_size=len(bomb))  # the signed digest stays the real blob's
    with pytest.raises(AssetChecksumError) as info:
        await Store(root).ensure(out, FileOpener(path))
    assert info.value.what == f"blob {out.layer_digest}"
    assert not Store(root).output_path(out.version, out.name).exists()


# -- signed chunks: decompressed while the download goes on -----------------------------------


def chunked(fx: Any, served: bytes | None = None, size: int = MIN_CHUNK_SIZE) -> Any:
    """`fx` with signed chunk digests of `served` (default: its own blob) in its spec."""
    data = fx.blob.read_bytes() if served is None else served
    hexes = "".join(
        hashlib.sha256(data[i : i + size]).hexdigest() for i in range(0, len(data), size)
    )
    return replace(fx.out, chunks=ChunkDigests(size, len(data), hexes))


def incompressible_fixture(tmp_path: Path) -> Any:
    # ~5 chunks of 64 KiB once compressed, with zero runs so the output has holes too.
    return make_fixture(tmp_path, os.urandom(200_000) + bytes(1 << 20) + os.urandom(120_000))


async def test_signed_chunks_are_decompressed_while_the_download_goes_on(
    root: Path, tmp_path: Path
) -> None:
    """With chunk digests the decoder follows the download: output exists before the
    last byte was sent (without them, decompression waits for the whole layer)."""
    fx = incompressible_fixture(tmp_path)
    out = chunked(fx)
    store = Store(root)
    seen_output: list[int] = []

    class Holding(FileOpener):
        async def _chunks(self, offset: int) -> AsyncIterator[bytes]:
            data = fx.blob.read_bytes()
            last = len(data) - 1000
            yield data[offset:last]
            # Hold the last bytes back until the output temp file has grown (or 10 s).
            for _ in range(1000):
                temps = store.stray_temp_files()
                if temps and temps[0].stat().st_size > 0:
                    seen_output.append(temps[0].stat().st_size)
                    break
                await asyncio.sleep(0.01)
            yield data[last:]

    path = await store.ensure(out, Holding(fx.blob))
    assert path.read_bytes() == fx.content
    assert seen_output, "nothing was decompressed before the download ended"


async def test_a_bad_chunk_stops_the_install_at_that_chunk(root: Path, tmp_path: Path) -> None:
    fx = incompressible_fixture(tmp_path)
    out = chunked(fx)
    bad = MIN_CHUNK_SIZE + 10  # in chunk 1
    with pytest.raises(AssetChecksumError) as info:
        await Store(root).ensure(out, FileOpener(fx.blob, flip_at=bad))
    end = min(2 * MIN_CHUNK_SIZE, out.layer_size) - 1
    assert info.value.what == f"chunk 1 (bytes {MIN_CHUNK_SIZE}-{end}) of blob {out.layer_digest}"
    assert out.chunks is not None
    assert info.value.expected == f"sha256:{out.chunks.digest(1).hex()}"
    assert_nothing_installed(Store(root), fx)


async def test_chunks_covering_the_blob_stand_for_the_layer_digest(
    root: Path, tmp_path: Path
) -> None:
    """Signed chunk digests covering every byte vouch for the blob as the layer digest
    does (docs/format.md §4): an install checks them and the content digest, and does not
    hash the layer again. A blob kept under its digest's name (`fetch_blob`) is still
    checked against that digest: chunks that match but add up to another blob (a
    publisher bug) are refused there."""
    fx = incompressible_fixture(tmp_path)
    other = zstandard.ZstdCompressor(level=1).compress(fx.content)  # same content
    assert other != fx.blob.read_bytes()
    served = tmp_path / "other.zst"
    served.write_bytes(other)
    out = replace(chunked(fx, other), layer_size=len(other))
    req = BlobRequest(out.layer_digest, out.layer_size, out.source, out.chunks)
    with pytest.raises(AssetChecksumError) as info:
        await Store(root).fetch_blob(req, FileOpener(served))
    assert info.value.what == f"blob {out.layer_digest}"
    assert_nothing_installed(Store(root), fx)

    path = await Store(root).ensure(out, FileOpener(served))
    assert path.read_bytes() == fx.content  # the signed content, through signed chunks


async def test_a_bomb_is_stopped_at_the_cap_when_a_thread_writes_the_output(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cap is checked before a byte is queued for the writer thread; the thread is
    stopped and the temp file removed."""
    from exec_sandbox_assets.base.errors import SizeLimitError
    from exec_sandbox_assets.cache import output

    monkeypatch.setattr(output, "_THREADED_FROM", 0)
    fx = make_fixture(tmp_path, bytes(8 << 20))  # zeros: a tiny blob
    out = replace(fx.out, content_size=3 << 20)  # signed as much smaller than it is
    with pytest.raises(SizeLimitError, match="exceeds its declared size"):
        await Store(root).ensure(out, FileOpener(fx.blob))
    assert Store(root).stray_temp_files() == []
    assert not [t for t in threading.enumerate() if t.name == "esa-output"]


# -- trust: records say what admitted them -------------------------------------------------------


def test_key_id_from_pem_is_the_key_id_of_the_crypto_stack(tmp_path: Path) -> None:
    for algorithm in keys.ALGORITHMS:
        key = keys.generate_key(algorithm)
        pub = keys.load_public_key(key.public.pem(), "test")
        assert key_id_from_pem(key.public.pem()) == pub.key_id
        path = tmp_path / f"{algorithm}.pub"
        path.write_bytes(key.public.pem())
        assert key_ids_of_files([path, tmp_path / "missing.pub"]) == {pub.key_id}
    assert key_id_from_pem(b"not a key") is None


async def test_records_carry_the_keys_that_admitted_them(root: Path, tmp_path: Path) -> None:
    fx = make_fixture(tmp_path)
    signed = replace(fx.out, verified_by=("a" * 64,))
    path = await Store(root).ensure(signed, FileOpener(fx.blob))
    record = json.loads((root / "v1.2.0" / ".verified" / f"{fx.out.name}.json").read_bytes())
    assert record["verified_by"] == ["a" * 64]

    assert Store(root, trust=CacheTrust(frozenset({"a" * 64}))).lookup("1.2.0", fx.out.name) == path
    # The key was removed from the trusted list: the file is not served any more.
    assert Store(root, trust=CacheTrust(frozenset({"b" * 64}))).lookup("1.2.0", fx.out.name) is None
    two = CacheTrust(frozenset({"a" * 64, "b" * 64}), threshold=2)
    assert Store(root, trust=two).lookup("1.2.0", fx.out.name) is None


async def test_an_unverified_file_is_fetched_again_by_a_verifying_store(
    root: Path, tmp_path: Path
) -> None:
    fx = make_fixture(tmp_path)
    await Store(root, trust=CacheTrust(insecure=True)).ensure(fx.out, FileOpener(fx.blob))
    record = json.loads((root / "v1.2.0" / ".verified" / f"{fx.out.name}.json").read_bytes())
    assert record["verified_by"] == "unverified"

    verifying = Store(root, trust=CacheTrust(frozenset({"a" * 64})))
    assert verifying.lookup("1.2.0", fx.out.name) is None
    opener = FileOpener(fx.blob)
    signed = replace(fx.out, verified_by=("a" * 64,))
    assert (await verifying.ensure(signed, opener)).read_bytes() == fx.content
    assert opener.offsets == [0]  # fetched and verified again, not served
    assert verifying.lookup("1.2.0", fx.out.name) is not None


WARM_TRUST = """
import json, sys
from pathlib import Path
from exec_sandbox_assets.client import AssetClient
from exec_sandbox_assets.config import load_settings
settings = load_settings(env={"EXEC_SANDBOX_CACHE_DIR": sys.argv[1],
                              "EXEC_SANDBOX_TRUSTED_KEYS": sys.argv[2],
                              "EXEC_SANDBOX_ASSET_VERSION": "1.2.0"})
client = AssetClient(settings)
found = client.find_cached(sys.argv[3])
print(json.dumps([str(found), "cryptography" in sys.modules]))
"""


async def test_warm_path_checks_the_trusted_keys_without_the_crypto_stack(
    root: Path, tmp_path: Path
) -> None:
    key = keys.generate_key()
    pub = tmp_path / "k.pub"
    pub.write_bytes(key.public.pem())
    fx = make_fixture(tmp_path)
    signed = replace(fx.out, verified_by=(key.public.key_id,))
    path = await Store(root).ensure(signed, FileOpener(fx.blob))
    out = subprocess.run(
        [sys.executable, "-c", WARM_TRUST, str(root), str(pub), fx.out.name],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(out) == [str(path), False]
    other = tmp_path / "other.pub"
    other.write_bytes(keys.generate_key().public.pem())
    out = subprocess.run(
        [sys.executable, "-c", WARM_TRUST, str(root), str(other), fx.out.name],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(out) == ["None", False]


# -- cache faults are the package's errors -------------------------------------------------------


async def test_a_cache_path_that_is_a_file_is_an_asset_error(tmp_path: Path) -> None:
    fx = make_fixture(tmp_path)
    not_a_dir = tmp_path / "cache"
    not_a_dir.write_bytes(b"a file")
    with pytest.raises(AssetError, match=str(not_a_dir)) as info:
        await Store(not_a_dir).ensure(fx.out, FileOpener(fx.blob))
    assert isinstance(info.value, CacheError)
    assert not isinstance(info.value, FileNotFoundError)


READ_ONLY = """
import asyncio, contextlib, json, os, sys, zstandard
from pathlib import Path
from exec_sandbox_assets.cache.store import OutputSpec, Store
from exec_sandbox_assets.base.errors import AssetError
cfg = json.loads(sys.argv[1])
blob = Path(cfg["blob"]).read_bytes()
# Everything imported (the interpreter lives under /root): now become nobody, for whom
# the cache, made by root with 0755, is read-only.
os.setgid(65534); os.setuid(65534)
@contextlib.asynccontextmanager
async def opener(offset):
    async def chunks():
        yield blob[offset:]
    yield chunks()
async def main():
    try:
        await Store(Path(cfg["root"])).ensure(OutputSpec(**cfg["out"]), opener)
    except AssetError as exc:
        print(json.dumps([type(exc).__name__, str(exc)]))
asyncio.run(main())
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as another user")
async def test_a_read_only_cache_is_an_asset_error_naming_the_path(
    root: Path, tmp_path: Path
) -> None:
    fx = make_fixture(tmp_path)
    root.mkdir(mode=0o755)
    tmp_path.chmod(0o755)
    cfg = {"out": fx.out.__dict__, "blob": str(fx.blob), "root": str(root)}
    out = subprocess.run(
        [sys.executable, "-c", READ_ONLY, json.dumps(cfg)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    kind, message = json.loads(out)
    assert kind == "CacheError"
    assert str(root) in message and "Permission denied" in message


def test_cli_exits_1_not_4_for_an_unusable_cache(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "cache"
    not_a_dir.write_bytes(b"a file")
    pub = tmp_path / "k.pub"
    pub.write_bytes(keys.generate_key().public.pem())
    layout = tmp_path / "layout"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from exec_sandbox_assets.cli import main; raise SystemExit(main())",
            "--cache-dir",
            str(not_a_dir),
            "--mirror",
            f"oci:{layout}",
            "--airgap",
            "--trusted-key",
            str(pub),
            "--asset-version",
            "1.0.0",
            "pull",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert str(not_a_dir) in proc.stderr


# -- file modes whatever the umask ---------------------------------------------------------------

UMASK = """
import asyncio, json, os, stat, sys
from contextlib import asynccontextmanager
from pathlib import Path
from exec_sandbox_assets.cache.store import OutputSpec, Store
cfg = json.loads(sys.argv[1])
os.umask(int(cfg["umask"], 8))
@asynccontextmanager
async def opener(offset):
    async def chunks():
        yield Path(cfg["blob"]).read_bytes()[offset:]
    yield chunks()
async def main():
    store = Store(Path(cfg["root"]))
    path = await store.ensure(OutputSpec(**cfg["out"]), opener)
    store.write_state("tag-latest", {"version": "1.2.0"})
    modes = {}
    for dirpath, dirs, files in os.walk(cfg["root"]):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            modes[os.path.relpath(p, cfg["root"])] = stat.S_IMODE(os.lstat(p).st_mode)
    modes["."] = stat.S_IMODE(os.stat(cfg["root"]).st_mode)
    print(json.dumps(modes))
asyncio.run(main())
"""


def modes_under_umask(tmp_path: Path, umask: int, **fixture: Any) -> dict[str, int]:
    fx = make_fixture(tmp_path, content_bytes(1 << 16), **fixture)
    root = tmp_path / f"cache-{umask:o}"
    cfg = {"out": fx.out.__dict__, "blob": str(fx.blob), "root": str(root), "umask": f"{umask:o}"}
    out = subprocess.run(
        [sys.executable, "-c", UMASK, json.dumps(cfg)], capture_output=True, text=True, check=True
    ).stdout
    modes: dict[str, int] = json.loads(out)
    return modes


def test_cache_directories_are_never_group_or_world_writable_under_umask_000(
    tmp_path: Path,
) -> None:
    modes = modes_under_umask(
        tmp_path, 0o000, compressed=False, executable=True, name="gvproxy-wrapper"
    )
    assert {".", "v1.2.0", "blobs", "locks", "refs"} <= set(modes)
    writable = {p: oct(m) for p, m in modes.items() if m & 0o022}
    assert writable == {}
    assert modes["v1.2.0/gvproxy-wrapper"] == 0o755


def test_files_honour_a_restrictive_umask(tmp_path: Path) -> None:
    modes = modes_under_umask(tmp_path, 0o077)
    assert modes["v1.2.0/vmlinuz-x86_64"] == 0o600
    assert modes["v1.2.0/.verified/vmlinuz-x86_64.json"] == 0o600
    assert modes["refs/tag-latest.json"] == 0o600
    assert all(m & 0o077 == 0 for m in modes.values()), {p: oct(m) for p, m in modes.items()}
