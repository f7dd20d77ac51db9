"""The patch annotation and the patch codec (docs/format.md §9), without servers: what
a malformed signed annotation does, and that the decoder never writes past the signed
size nor accepts a truncated or padded patch. Interoperable with the zstd CLI."""

from __future__ import annotations

import hashlib
import io
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from exec_sandbox_assets.base.errors import FormatError
from exec_sandbox_assets.release.delta import (
    ANN_PATCHES,
    MAX_PATCHES,
    Patch,
    format_patches,
    read_patches,
)
from exec_sandbox_assets.release.patchcodec import PatchError, apply_patch, make_patch

D1 = "sha256:" + "a" * 64
D2 = "sha256:" + "b" * 64


def files(tmp_path: Path) -> tuple[Path, Path]:
    rng = random.Random(3)
    old = rng.randbytes(300_000) + bytes(200_000)
    new = old[:100_000] + rng.randbytes(5_000) + old[100_000:] + b"appended" * 1000
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    return tmp_path / "old", tmp_path / "new"


def make(tmp_path: Path) -> tuple[Path, Path, Path]:
    old, new = files(tmp_path)
    patch = tmp_path / "patch"
    with old.open("rb") as o, new.open("rb") as n, patch.open("wb") as p:
        make_patch(o, n, p, 9)
    return old, new, patch


def decode(old: Path, patch: bytes, cap: int) -> bytes:
    out = bytearray()
    with old.open("rb") as o:
        apply_patch(o, io.BytesIO(patch), out.extend, cap)
    return bytes(out)


def test_round_trip_and_the_patch_is_small(tmp_path: Path) -> None:
    old, new, patch = make(tmp_path)
    assert decode(old, patch.read_bytes(), new.stat().st_size) == new.read_bytes()
    assert patch.stat().st_size < 20_000  # the 5 KB inserted, not the 500 KB file


def test_the_output_cap_stops_the_decoder(tmp_path: Path) -> None:
    old, new, patch = make(tmp_path)
    with pytest.raises(PatchError, match="exceeds its signed size"):
        decode(old, patch.read_bytes(), new.stat().st_size - 1)


@pytest.mark.parametrize("cut", ["truncated", "padded"])
def test_a_truncated_or_padded_patch_is_refused(tmp_path: Path, cut: str) -> None:
    old, new, patch = make(tmp_path)
    data = patch.read_bytes()
    data = data[:-10] if cut == "truncated" else data + data
    with pytest.raises(PatchError):
        decode(old, data, new.stat().st_size * 3)


def test_the_wrong_reference_never_yields_the_content(tmp_path: Path) -> None:
    """A base that is not the one the patch names decodes to other bytes (or fails):
    the content digest check is what catches it."""
    _old, new, patch = make(tmp_path)
    other = tmp_path / "other"
    other.write_bytes(random.Random(9).randbytes(500_000))
    try:
        got = decode(other, patch.read_bytes(), new.stat().st_size)
    except PatchError:
        return
    assert hashlib.sha256(got).digest() != hashlib.sha256(new.read_bytes()).digest()


@pytest.mark.skipif(shutil.which("zstd") is None, reason="the zstd CLI is not installed")
def test_the_zstd_cli_applies_our_patches(tmp_path: Path) -> None:
    old, new, patch = make(tmp_path)
    out = tmp_path / "by-cli"
    subprocess.run(
        ["zstd", "-q", "-d", "--long=31", f"--patch-from={old}", str(patch), "-o", str(out)],
        check=True,
    )
    assert out.read_bytes() == new.read_bytes()


def test_annotation_round_trip() -> None:
    patches = (Patch(D1, 10, D2, 5), Patch(D2, 7, D1, 3))
    assert read_patches({ANN_PATCHES: format_patches(patches)}, "t") == patches
    assert read_patches({}, "t") == ()


@pytest.mark.parametrize(
    "value",
    [
        "",
        f"{D1} 10 {D2}",
        f"{D1} 10 {D2} 5 extra",
        f"{D1} -1 {D2} 5",
        f"{D1} 1e3 {D2} 5",
        f"{D1} 10 sha256:xyz 5",
        f"{D1} 10 {D2} {'9' * 20}",
        f"{D1} 10 {D2} 5,{D1} 11 {D2} 6",  # two patches from one content
        ",".join([f"{D1} 10 {D2} 5"] * (MAX_PATCHES + 1)),
        f"{D1}  10 {D2} 5",
    ],
)
def test_a_malformed_annotation_is_refused(value: str) -> None:
    with pytest.raises(FormatError):
        read_patches({ANN_PATCHES: value}, "t")
