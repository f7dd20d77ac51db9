"""The GitHub Release asset folder (docs/format.md §6).

Every layer file under its title (byte-identical to its blob), the index and each
platform manifest exactly as pushed, the signature manifest and its payloads, the
Sigstore bundle (`oci-index.sigstore.json`) of a keyless-signed release, and a
`SHA256SUMS` in `sha256sum` format over all of them. Each file is written to a temp
name and renamed, so an interrupted run leaves whole files only; re-running with the
same release rewrites identical bytes.

The folder must hold nothing else: an upload step usually takes `DIR/*`, and a stale
file of another release would ship with this one. Nor is another release's folder
overwritten unless asked (`replace`, `--replace-release-dir`): its file names are the
same for every version, so without the check a `--release-dir` pointing at last
release's folder would silently become this one. With `replace`, the files the old
`SHA256SUMS` lists and this release lacks are removed; anything else still refuses.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from exec_sandbox_assets.base.errors import ConfigError, FormatError
from exec_sandbox_assets.base.fsutil import CHUNK, atomic_output, open_regular
from exec_sandbox_assets.oci.model import MAX_MANIFEST_SIZE, Index, sha256_digest
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


@dataclass(frozen=True)
class HeldRelease:
    """The release a folder holds already, from its index file."""

    version: str | None  # None: the index is unreadable or names none
    index_digest: str
    created: str | None = None  # reused by a re-run, as an existing vV tag's is


def _read_small(path: Path, cap: int) -> bytes | None:
    """A regular file's bytes (None when absent; a FIFO or directory is never read)."""
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read(cap)


def held_release(dest: Path) -> HeldRelease | None:
    """What `dest` holds, or None for a folder without a release index (new, or empty)."""
    data = _read_small(dest / INDEX_FILE, MAX_MANIFEST_SIZE + 1)
    if data is None:
        return None
    try:
        annotations = Index.from_bytes(data, str(dest / INDEX_FILE)).annotations
    except FormatError:
        annotations = {}
    return HeldRelease(
        annotations.get(catalog.ANN_VERSION),
        sha256_digest(data),
        annotations.get(catalog.ANN_CREATED),
    )


def check_release_dir(
    dest: Path, version: str, index_digest: str | None = None, *, replace: bool = False
) -> HeldRelease | None:
    """Refuse a folder that holds another release (another version; with `index_digest`,
    also another build of this version) unless `replace`. Returns what it holds."""
    held = held_release(dest)
    if held is None or replace:
        return held
    other_version = held.version is None or held.version.removeprefix("v") != version
    if other_version or (index_digest is not None and held.index_digest != index_digest):
        what = (
            f"release {held.version}" if held.version else "a release of unknown version"
        ) + f" (index {held.index_digest})"
        if not other_version:
            what = f"another build of {what}"
        raise ConfigError(
            f"release folder {dest} holds {what}, not release {version}: use an empty "
            "folder, or pass --replace-release-dir to replace it"
        )
    return held


def _old_release_files(dest: Path) -> set[str]:
    """The file names the folder's SHA256SUMS lists (only safe single names)."""
    data = _read_small(dest / SUMS_FILE, 1 << 20) or b""
    names = {line.partition("  ")[2] for line in data.decode("utf-8", "replace").splitlines()}
    return {n for n in names if catalog.is_valid_title(n)}


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


def write_release_dir(dest: Path, files: ReleaseFiles, *, replace: bool = False) -> tuple[str, ...]:
    """Write the folder; returns the file names written (SHA256SUMS last). A folder of
    another release is refused unless `replace` (see the module docstring)."""
    names = release_file_names(files)
    version = Index.from_bytes(files.index, "the new index").annotations.get(catalog.ANN_VERSION)
    check_release_dir(dest, version or "", sha256_digest(files.index), replace=replace)
    dest.mkdir(parents=True, exist_ok=True)
    expected = {*names, SUMS_FILE}
    for leftover in dest.glob(".tmp-*"):  # ours, from an interrupted run
        leftover.unlink()
    if replace:
        for name in _old_release_files(dest) - expected:
            (dest / name).unlink(missing_ok=True)
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
    "HeldRelease",
    "ReleaseFiles",
    "check_release_dir",
    "held_release",
    "manifest_file",
    "payload_file",
    "release_file_names",
    "write_release_dir",
]
