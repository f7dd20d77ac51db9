"""The publisher's chunk digests come from the pass that writes or reads each blob
(issue 18): the same digests a second read would give, for every kind of input."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import zstandard

from exec_sandbox_assets.publish import publisher
from exec_sandbox_assets.publish.compress import (
    compress_cached,
    compress_file,
    inspect_zst,
    raw_blob,
)
from exec_sandbox_assets.release.chunks import ChunkHasher, chunk_digests_of

MiB = 1 << 20


@pytest.fixture
def source(tmp_path: Path) -> Path:
    rng = random.Random(18)
    path = tmp_path / "input.bin"
    # Incompressible enough that the blob spans several 4 MiB chunks.
    path.write_bytes(rng.randbytes(9 * MiB) + bytes(3 * MiB))
    return path


def test_every_kind_of_blob_carries_the_chunk_digests_of_its_bytes(
    source: Path, tmp_path: Path
) -> None:
    made = compress_file(source, tmp_path / "a.zst", 1)
    reused = compress_cached(source, tmp_path / "b.zst", 1)  # first run: compresses
    again = compress_cached(source, tmp_path / "b.zst", 1)  # second run: reuses
    pre = tmp_path / "pre.zst"
    pre.write_bytes(zstandard.ZstdCompressor(level=1).compress(source.read_bytes()))
    for blob in (made, reused, again, inspect_zst(pre), raw_blob(source)):
        assert blob.chunks is not None
        assert blob.chunks == chunk_digests_of(blob.path), blob.path
        assert blob.chunks.total == blob.size
    chunks = raw_blob(source).chunks
    assert chunks is not None and chunks.count == 3


def test_the_publisher_does_not_read_a_blob_again_for_its_chunks(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blob = compress_file(source, tmp_path / "a.zst", 1)

    def second_read(path: Path, size: int = 0) -> None:
        raise AssertionError(f"{path} read again for its chunk digests")

    monkeypatch.setattr(publisher, "chunk_digests_of", second_read)
    assert publisher._chunks_of(blob) == blob.chunks


@pytest.mark.parametrize("piece", [1, 4095, 4 * MiB, 4 * MiB + 1, 13 * MiB])
def test_chunk_hasher_is_independent_of_how_the_bytes_are_cut(piece: int, source: Path) -> None:
    data = source.read_bytes()[: 9 * MiB + 7] if piece > 1 else source.read_bytes()[:70000]
    hasher = ChunkHasher(64 << 10)
    for i in range(0, len(data), piece):
        hasher.update(data[i : i + piece])
    whole = ChunkHasher(64 << 10)
    whole.update(data)
    assert hasher.result() == whole.result()
    assert hasher.result().count == -(-len(data) // (64 << 10))
