"""`zstd --patch-from` patches: a zstd frame of the new file that refers into the old one.

The old file is the frame's *prefix* (zstd's `refPrefix`): the decoder behaves as if
the old bytes had just been decoded, so every long match into them costs a few bytes.
This is exactly what `zstd --patch-from=OLD NEW` writes, and `zstd -d --patch-from=OLD
--long=31` reads a patch made here (docs/format.md §9).

python-zstandard's own API only offers dictionaries, and libzstd indexes only the last
few MiB of a large dictionary (patches came out at 30-50x the size of the CLI's), so
both sides go through python-zstandard's cffi binding to the same libzstd and reference
the old file as a prefix, memory-mapped: nothing of it is copied.

Pure apart from the files handed in. `cffi` (a dependency of `cryptography`) is needed
at run time; `DeltaUnavailable` says so when it is missing, and callers fall back.
"""

from __future__ import annotations

import importlib
import mmap
import os
import struct
import sys
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any, BinaryIO

CHUNK = 1 << 20
# libzstd's largest window (--long=31): the prefix and the new file must both fit in it.
MAX_WINDOW_LOG = 31
_MIN_WINDOW_LOG = 10


class DeltaUnavailable(Exception):
    """The binding this needs cannot be loaded here."""


class PatchError(Exception):
    """libzstd refused the patch (corrupt, wrong reference, output over its cap)."""


def _binding() -> tuple[Any, Any]:
    try:
        binding = importlib.import_module("zstandard.backend_cffi")
    except ImportError as exc:  # no cffi, or a zstandard build without the binding
        raise DeltaUnavailable(f"python-zstandard's cffi binding is unavailable: {exc}") from exc
    return binding.ffi, binding.lib


def window_log(old_size: int, new_size: int) -> int:
    """The window that lets the end of the new file still see the start of the old one."""
    need = max(old_size + new_size, 1).bit_length()
    if need > MAX_WINDOW_LOG:
        raise PatchError(f"old {old_size} + new {new_size} bytes exceed zstd's largest window")
    return max(need, _MIN_WINDOW_LOG)


def _check(lib: Any, ffi: Any, code: int, what: str) -> int:
    if lib.ZSTD_isError(code):
        raise PatchError(f"{what}: {ffi.string(lib.ZSTD_getErrorName(code)).decode()}")
    return code


def _map(f: BinaryIO, size: int, stack: ExitStack) -> Any:
    """`f`'s first `size` bytes: a read-only mapping, or a copy where a mapping could
    kill the process (an empty buffer for 0)."""
    if size == 0:
        return b""
    if _faults_may_fail(f.fileno()):
        f.seek(0)
        return f.read(size)
    view = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
    stack.callback(view.close)
    return view


_TMPFS_MAGIC = 0x01021994


def _faults_may_fail(fd: int) -> bool:
    """Whether reading a mapped page may need a page allocation: a hole of a sparse file
    on tmpfs. When tmpfs is full that read fault is a SIGBUS (measured: the process
    dies), so such a reference is read into memory instead."""
    st = os.fstat(fd)
    if st.st_blocks * 512 >= st.st_size or not sys.platform.startswith("linux"):
        return False
    import ctypes  # only for sparse references

    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is its first field
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.fstatfs(fd, buf) != 0:
        return True  # unknown: the safe way
    return bool(struct.unpack_from("l", buf.raw)[0] == _TMPFS_MAGIC)


def make_patch(old: BinaryIO, new: BinaryIO, out: BinaryIO, level: int) -> None:
    """Write the patch turning `old` into `new` (whole files, read from 0) to `out`.

    Single-threaded, so the same inputs and level always give the same bytes (the
    publisher's re-runs change no digest).
    """
    ffi, lib = _binding()
    old_size = os.fstat(old.fileno()).st_size
    new_size = os.fstat(new.fileno()).st_size
    cctx = ffi.gc(lib.ZSTD_createCCtx(), lib.ZSTD_freeCCtx)
    # As `zstd --patch-from` does: the level's parameters for a source of the new
    # file's size with the old one as dictionary (larger tables than the level alone).
    cp = lib.ZSTD_getCParams(level, new_size, old_size)
    for param, value in (
        (lib.ZSTD_c_compressionLevel, level),
        (lib.ZSTD_c_windowLog, window_log(old_size, new_size)),
        (lib.ZSTD_c_hashLog, cp.hashLog),
        (lib.ZSTD_c_chainLog, cp.chainLog),
        (lib.ZSTD_c_searchLog, cp.searchLog),
        (lib.ZSTD_c_minMatch, cp.minMatch),
        (lib.ZSTD_c_targetLength, cp.targetLength),
        (lib.ZSTD_c_strategy, cp.strategy),
        (lib.ZSTD_c_enableLongDistanceMatching, 1),
        (lib.ZSTD_c_checksumFlag, 1),
        (lib.ZSTD_c_contentSizeFlag, 1),
    ):
        _check(lib, ffi, lib.ZSTD_CCtx_setParameter(cctx, param, value), "zstd parameter")
    _check(lib, ffi, lib.ZSTD_CCtx_setPledgedSrcSize(cctx, new_size), "zstd source size")
    with ExitStack() as stack:
        ref = ffi.from_buffer(_map(old, old_size, stack))
        stack.callback(ffi.release, ref)  # before the mapping closes
        _check(lib, ffi, lib.ZSTD_CCtx_refPrefix(cctx, ref, old_size), "zstd reference")
        outbuf = ffi.new("char[]", CHUNK)
        dst = ffi.new("ZSTD_outBuffer *")
        src = ffi.new("ZSTD_inBuffer *")
        left = new_size
        new.seek(0)
        while True:
            block = new.read(CHUNK) if left else b""
            left -= len(block)
            mode = lib.ZSTD_e_continue if left else lib.ZSTD_e_end
            keep = ffi.from_buffer(block)
            src.src, src.size, src.pos = keep, len(block), 0
            while True:
                dst.dst, dst.size, dst.pos = outbuf, CHUNK, 0
                pending = _check(lib, ffi, lib.ZSTD_compressStream2(cctx, dst, src, mode), "zstd")
                out.write(ffi.buffer(outbuf, dst.pos))
                if mode == lib.ZSTD_e_end and pending == 0:
                    return
                if mode != lib.ZSTD_e_end and src.pos == src.size:
                    break
            if mode == lib.ZSTD_e_end:
                return  # pragma: no cover - the loop above returns


def apply_patch(
    reference: BinaryIO,
    patch: BinaryIO,
    write: Callable[[bytes], object],
    cap: int,
) -> int:
    """Decode `patch` against `reference`, handing the output to `write` in pieces.

    Stops with PatchError the moment the output would exceed `cap` bytes, or when the
    patch is not one complete frame. Returns the number of bytes written. The caller
    has checked the patch's digest before calling this: nothing unverified is decoded.
    """
    ffi, lib = _binding()
    ref_size = os.fstat(reference.fileno()).st_size
    dctx = ffi.gc(lib.ZSTD_createDCtx(), lib.ZSTD_freeDCtx)
    _check(
        lib,
        ffi,
        lib.ZSTD_DCtx_setParameter(dctx, lib.ZSTD_d_windowLogMax, MAX_WINDOW_LOG),
        "zstd parameter",
    )
    total = 0
    with ExitStack() as stack:
        ref = ffi.from_buffer(_map(reference, ref_size, stack))
        stack.callback(ffi.release, ref)  # before the mapping closes
        _check(lib, ffi, lib.ZSTD_DCtx_refPrefix(dctx, ref, ref_size), "zstd reference")
        outbuf = ffi.new("char[]", CHUNK)
        dst = ffi.new("ZSTD_outBuffer *")
        src = ffi.new("ZSTD_inBuffer *")
        pending = 1
        while block := patch.read(CHUNK):
            if pending == 0:
                raise PatchError("data after the end of the patch frame")
            keep = ffi.from_buffer(block)
            src.src, src.size, src.pos = keep, len(block), 0
            while src.pos < src.size or dst.pos == dst.size:
                dst.dst, dst.size, dst.pos = outbuf, CHUNK, 0
                pending = _check(
                    lib, ffi, lib.ZSTD_decompressStream(dctx, dst, src), "patch undecodable"
                )
                if dst.pos:
                    total += dst.pos
                    if total > cap:
                        raise PatchError(f"patch output exceeds its signed size of {cap} bytes")
                    write(bytes(ffi.buffer(outbuf, dst.pos)))
                if pending == 0:
                    if src.pos < src.size:
                        raise PatchError("data after the end of the patch frame")
                    break
        if pending != 0:
            raise PatchError("patch ends before its frame does (truncated)")
    return total


__all__ = ["DeltaUnavailable", "PatchError", "apply_patch", "make_patch", "window_log"]
