"""The GitHub Release asset folder (docs/format.md §6).

Every layer file under its title (byte-identical to its blob), the index and each
platform manifest exactly as pushed, the signature manifest and its payloads, the
Sigstore bundle (`oci-index.sigstore.json`) of a keyless-signed release, and a
`SHA256SUMS` in `sha256sum` format over all of them. Each file is written to a temp
name and renamed, so an interrupted run leaves whole files only; re-running with the
same release rewrites identical bytes.

The folder must hold nothing else: an upload step usually takes `DIR/*`, and a stale
file of another release would ship with this one.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from exec_sandbox_assets.base.errors import ConfigError
from exec_sandbox_assets.base.fsutil import CHUNK, atomic_output
from exec_sandbox_assets.release import catalog
from exec_sandbox_assets.release import documents as release
from exec_sandbox_assets.release.signing import SignatureManifest

# The names are shared with the client's releases source (release.py).
INDEX_FILE = release.RELEASE_INDEX_FILE
SIGNATURE_FILE = release.RELEASE_SIGNATURE_FILE
BUNDLE_FILE = release.RELEASE_BUNDLE_FILE
manifest_file = release.release_manifest_file
payload_file = release.release_payload_file
SUMS_FILE = "SHA256SUMS"


@dataclass(frozen=True)
class ReleaseFiles:
    """Everything the folder receives; `layers` maps title -> blob file."""

    layers: Mapping[str, Path]
    index: bytes
    manifests: Mapping[tuple[str, str], bytes]
    signature: SignatureManifest | None  # None: signed keyless only
    bundle: bytes | None = None  # the Sigstore bundle (keyless signature)


def _write_bytes(path: Path, data: bytes) -> str:
    with atomic_output(path) as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


def _copy_file(src: Path, path: Path) -> str:
    # A copy, not a link: the folder must not change if the work dir is reused.
    hasher = hashlib.sha256()
    with src.open("rb") as fin, atomic_output(path) as fout:
        while chunk := fin.read(CHUNK):
            hasher.update(chunk)
            fout.write(chunk)
        os.fchmod(fout.fileno(), stat.S_IMODE(os.fstat(fin.fileno()).st_mode))
    return hasher.hexdigest()


def release_file_names(files: ReleaseFiles) -> list[str]:
    names = [*files.layers, INDEX_FILE, *(manifest_file(o, a) for o, a in files.manifests)]
    if files.signature is not None:
        names += [SIGNATURE_FILE, *(payload_file(n) for n in range(len(files.signature.payloads)))]
    if files.bundle is not None:
        names.append(BUNDLE_FILE)
    for name in names:
        catalog.check_title(name, "release folder")
    return names


def write_release_dir(dest: Path, files: ReleaseFiles) -> tuple[str, ...]:
    """Write the folder; returns the file names written (SHA256SUMS last)."""
    names = release_file_names(files)
    dest.mkdir(parents=True, exist_ok=True)
    expected = {*names, SUMS_FILE}
    for leftover in dest.glob(".tmp-*"):  # ours, from an interrupted run
        leftover.unlink()
    stray = sorted(p.name for p in dest.iterdir() if p.name not in expected)
    if stray:
        raise ConfigError(
            f"release folder {dest} holds files that are not part of this release: "
            f"{', '.join(stray)}; use an empty folder"
        )
    sums: dict[str, str] = {}
    for title, src in files.layers.items():
        sums[title] = _copy_file(src, dest / title)
    sums[INDEX_FILE] = _write_bytes(dest / INDEX_FILE, files.index)
    for (os_, goarch), data in files.manifests.items():
        sums[manifest_file(os_, goarch)] = _write_bytes(dest / manifest_file(os_, goarch), data)
    if files.signature is not None:
        sums[SIGNATURE_FILE] = _write_bytes(dest / SIGNATURE_FILE, files.signature.manifest)
        for n, payload in enumerate(files.signature.payloads):
            sums[payload_file(n)] = _write_bytes(dest / payload_file(n), payload)
    if files.bundle is not None:
        sums[BUNDLE_FILE] = _write_bytes(dest / BUNDLE_FILE, files.bundle)
    # Two spaces = binary-agnostic text mode, what `sha256sum -c` reads everywhere.
    text = "".join(f"{sums[name]}  {name}\n" for name in sorted(sums))
    _write_bytes(dest / SUMS_FILE, text.encode())
    return (*names, SUMS_FILE)


__all__ = [
    "BUNDLE_FILE",
    "INDEX_FILE",
    "SIGNATURE_FILE",
    "SUMS_FILE",
    "ReleaseFiles",
    "manifest_file",
    "payload_file",
    "release_file_names",
    "write_release_dir",
]
