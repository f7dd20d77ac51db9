"""A small synthetic build output, so the README demo and the tests need no real build.

File names come from the catalog (raw, uncompressed names, as the image build and the
gvproxy build leave them). Contents are deterministic (seeded by the file name),
start with the right magic (bzImage, ELF, cpio, qcow2, Mach-O) and compress roughly
like the real thing: zero runs, text, and incompressible stretches.
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Sequence
from pathlib import Path

from exec_sandbox_assets.release import catalog
from exec_sandbox_assets.release.catalog import AssetSpec, Kind

DEFAULT_SIZE = 256 * 1024

_WORDS = (
    b"import os\n",
    b"def main():\n",
    b"    return 0\n",
    b"/usr/lib/python3.14/site-packages/",
    b"#!/bin/sh\nexec /sbin/init\n",
    b"libc.so.6\0",
    b"GLIBC_2.34\0",
    b"console=ttyS0 quiet\n",
    b"node_modules/.bin/",
    b"Copyright (c) the exec-sandbox authors\n",
)


def _header(spec: AssetSpec, size: int) -> bytes:
    """Leading bytes in the real format, so `file` and humans recognise the sample."""
    if spec.kind is Kind.BASE_IMAGE:
        # qcow2 v3: magic, version, backing file offset/size, cluster bits, virtual size.
        return struct.pack(">4sIQIIQ", b"QFI\xfb", 3, 0, 0, 16, 64 * size)
    if spec.kind is Kind.INITRAMFS:
        return b"070701" + b"0" * 104 + b"TRAILER!!!\0"
    if spec.kind is Kind.KERNEL and spec.output_name.startswith("vmlinux"):
        return b"\x7fELF\x02\x01\x01" + bytes(9)
    if spec.kind is Kind.KERNEL:
        return bytes(0x202) + b"HdrS"  # the bzImage setup header signature
    if spec.arch.startswith("darwin-"):
        return b"\xcf\xfa\xed\xfe"  # Mach-O 64-bit
    return b"\x7fELF\x02\x01\x01" + bytes(9)


def sample_bytes(spec: AssetSpec, size: int) -> bytes:
    """`size` deterministic bytes for `spec`: its magic, then a compressible mix."""
    seed = int.from_bytes(hashlib.sha256(spec.output_name.encode()).digest()[:8], "big")
    rng = random.Random(seed)  # noqa: S311 (reproducible test data, not secrets)
    out = bytearray(_header(spec, size))
    while len(out) < size:
        roll = rng.random()
        run = rng.randrange(512, 8192)
        if roll < 0.35:
            out += bytes(run)
        elif roll < 0.8:
            while run > 0:
                word = rng.choice(_WORDS)
                out += word
                run -= len(word)
        else:
            out += rng.randbytes(run)
    return bytes(out[:size])


def sample_specs(arches: Sequence[str], oses: Sequence[str]) -> tuple[AssetSpec, ...]:
    """Every catalog entry a build for these arches and host OSes produces."""
    specs: dict[str, AssetSpec] = {}
    for arch in arches:
        for spec in catalog.vm_assets(arch):
            specs[spec.name] = spec
        for os_ in oses:
            gv = catalog.gvproxy(os_, catalog.GOARCH[catalog.check_arch(arch)])
            specs[gv.name] = gv
    return tuple(specs.values())


def make_sample_inputs(
    dest: Path,
    arches: Sequence[str] = ("x86_64", "aarch64"),
    oses: Sequence[str] = ("linux",),
    size: int = DEFAULT_SIZE,
) -> Path:
    """Write a build-output-like directory under `dest` (created) and return it."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for spec in sample_specs(arches, oses):
        path = dest / spec.output_name
        path.write_bytes(sample_bytes(spec, size))
        if spec.kind is Kind.GVPROXY:
            path.chmod(0o755)
    return dest


__all__ = ["DEFAULT_SIZE", "make_sample_inputs", "sample_bytes", "sample_specs"]


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m exec_sandbox_assets.publish.sample DIR`: write a sample build output."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m exec_sandbox_assets.publish.sample",
        description="Write a small synthetic build output (for demos and tests).",
    )
    parser.add_argument("dest", type=Path)
    parser.add_argument("--arch", action="append", choices=catalog.ARCHES)
    parser.add_argument("--os", action="append", choices=catalog.OSES)
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="bytes per file")
    args = parser.parse_args(argv)
    dest = make_sample_inputs(
        args.dest, tuple(args.arch or catalog.ARCHES), tuple(args.os or ("linux",)), args.size
    )
    print(dest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
