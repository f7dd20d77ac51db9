"""Measure zstd levels on realistic release data, to pick the publisher's default level.

    python benchmarks/compress_levels.py [--size-mib 64] [--levels 1,3,6,9,12,15,19] [FILE ...]

Data: a qcow2-like image (64 KiB clusters: a qcow2 header, zero clusters, clusters
copied from real files of this machine - ELF binaries, shared libraries, Python
sources - and incompressible clusters, in proportions like a small Debian rootfs),
plus any kernel under /boot and any FILE given (e.g. a Go binary as a gvproxy
stand-in). Prints ratio (compressed/original) and compression MB/s per level,
multi-threaded as the publisher runs it (threads=-1), and
single-threaded decompression MB/s (what every host pays).
"""

from __future__ import annotations

import argparse
import os
import random
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import zstandard

CLUSTER = 64 * 1024
DEFAULT_LEVELS = (1, 3, 6, 9, 12, 15, 19)


def _real_files(roots: tuple[str, ...], suffixes: tuple[str, ...]) -> Iterator[Path]:
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for name in sorted(files):
                path = Path(dirpath, name)
                wanted = path.suffix in suffixes or (not suffixes and os.access(path, os.X_OK))
                if wanted and path.is_file() and not path.is_symlink():
                    yield path


def _pool(paths: Iterator[Path], limit: int) -> bytes:
    out = bytearray()
    for path in paths:
        try:
            out += path.read_bytes()
        except OSError:
            continue
        if len(out) >= limit:
            break
    return bytes(out[:limit])


def qcow2_like(size: int, seed: int = 0) -> bytes:
    """A qcow2-shaped image whose clusters come from real files on this machine."""
    rng = random.Random(seed)
    binaries = _pool(_real_files(("/usr/bin", "/usr/lib/x86_64-linux-gnu", "/usr/lib"), ()), size)
    sources = _pool(_real_files((sys.prefix + "/lib",), (".py", ".txt", ".html")), size)
    header = struct.pack(">4sIQIIQ", b"QFI\xfb", 3, 0, 0, 16, size) + bytes(CLUSTER - 32)
    out = bytearray(header)
    # Roughly a slim rootfs: a quarter unused (zero), binaries, text, some compressed data.
    kinds = ("zero",) * 25 + ("binary",) * 40 + ("text",) * 25 + ("random",) * 10
    while len(out) < size:
        kind = rng.choice(kinds)
        if kind == "zero":
            out += bytes(CLUSTER)
        elif kind == "random":
            out += rng.randbytes(CLUSTER)
        else:
            pool = binaries if kind == "binary" else sources
            start = rng.randrange(0, max(1, len(pool) - CLUSTER))
            out += pool[start : start + CLUSTER].ljust(CLUSTER, b"\0")
    return bytes(out[:size])


def measure(name: str, data: bytes, levels: tuple[int, ...]) -> None:
    print(f"\n{name}: {len(data) / 2**20:.1f} MiB")
    print(f"{'level':>5} {'ratio':>7} {'MB/s':>8} {'dec MB/s':>9} {'MiB out':>8}")
    dctx = zstandard.ZstdDecompressor()
    for level in levels:
        cctx = zstandard.ZstdCompressor(level=level, threads=-1, write_content_size=True)
        t0 = time.perf_counter()
        out = cctx.compress(data)
        t1 = time.perf_counter()
        back = dctx.decompress(out)
        t2 = time.perf_counter()
        assert back == data
        print(
            f"{level:>5} {len(out) / len(data):>7.3f} {len(data) / (t1 - t0) / 1e6:>8.1f}"
            f" {len(data) / (t2 - t1) / 1e6:>9.1f} {len(out) / 2**20:>8.2f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--levels", default=",".join(map(str, DEFAULT_LEVELS)))
    parser.add_argument("files", nargs="*", type=Path)
    args = parser.parse_args()
    levels = tuple(int(x) for x in args.levels.split(","))
    print(f"zstandard {zstandard.__version__}, {os.cpu_count()} CPUs, threads=-1")
    measure("qcow2-like", qcow2_like(args.size_mib * 2**20), levels)
    kernels = sorted(Path("/boot").glob("vmlinuz*")) if Path("/boot").is_dir() else []
    for path in [*kernels[:1], *args.files]:
        measure(str(path), path.read_bytes(), levels)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
