"""The publisher's delta step (docs/format.md §9): patches from earlier releases.

For each large file of the new release, a `zstd --patch-from` patch against the same
file (by title) of each earlier release it can read: from the publish targets (by
default) or named sources, a registry, an OCI layout or archive, or a release folder
(`--release-dir` of an earlier run). The earlier releases are the last two by tag,
unless named. Their layers are read by digest and decompressed here, and each base's
content digest is computed here, not taken on trust: a patch names exactly the bytes it
was made from. Every patch is decoded once more and checked against the new content
digest before it is published; one no smaller than half the layer is dropped (a full
download is as good).

Nothing here needs the earlier release to be signed: a client applies a patch only to
a file it verified against the digest the patch names, and checks the result against
the new release's signed content digest.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from exec_sandbox_assets.base.errors import (
    AssetChecksumError,
    AssetError,
    AssetNotFoundError,
)
from exec_sandbox_assets.base.fsutil import CHUNK
from exec_sandbox_assets.cache.listing import version_key
from exec_sandbox_assets.oci.model import (
    MAX_MANIFEST_SIZE,
    MEDIA_TYPE_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    sha256_digest,
)
from exec_sandbox_assets.oci.policy import TransferPolicy
from exec_sandbox_assets.oci.reference import LayoutRef, parse_source_ref
from exec_sandbox_assets.publish.compress import Blob
from exec_sandbox_assets.publish.inputs import ReleaseInputs
from exec_sandbox_assets.publish.signatures import run_async
from exec_sandbox_assets.release import catalog
from exec_sandbox_assets.release.delta import (
    MAX_PATCHES,
    Patch,
    keepalive_manifest,
    manifest_patches,
)
from exec_sandbox_assets.release.documents import (
    RELEASE_INDEX_FILE,
    AssetLayer,
    BuiltRelease,
    read_asset_layers,
)
from exec_sandbox_assets.release.patchcodec import DeltaUnavailable, PatchError, make_patch
from exec_sandbox_assets.release.signing import SignatureLayer
from exec_sandbox_assets.release.version import tag_for, version_of_tag
from exec_sandbox_assets.sources.base import Source

if TYPE_CHECKING:
    from exec_sandbox_assets.client import Progress
    from exec_sandbox_assets.oci.target import Target
    from exec_sandbox_assets.oci.targets import RegistryOptions

log = logging.getLogger(__name__)

# Measured (benchmarks/delta.py, a 96 MiB image, 4.4 MiB changed): level 9 made a 611 KiB
# patch in 0.9 s, 3 one 651 KiB in 2.3 s, 15 one 603 KiB in 24 s, and 19 (btultra2) one
# of 2.1 MiB in 28 s: 9 is the default whatever the layers' level.
PATCH_LEVEL = 9
DEFAULT_DELTA_RELEASES = 2
# Smaller files are cheap to download whole (kernels are ~10 MiB and do get patches).
MIN_DELTA_SIZE = 1 << 20
# A patch must save at least half of the layer to be worth a manifest entry.
_WORTH = 0.5


@dataclass(frozen=True)
class DeltaRequest:
    """Which earlier releases to make patches from, and where to read them."""

    sources: tuple[str, ...]  # registry refs, oci:DIR, oci-archive:FILE, release folders
    versions: tuple[str, ...] | None = None  # None: the last DEFAULT_DELTA_RELEASES by tag
    level: int = PATCH_LEVEL


@dataclass(frozen=True)
class PatchFile:
    """A patch made for the file `name`, ready to push."""

    name: str
    patch: Patch
    path: Path


@dataclass(frozen=True)
class _Base:
    """An earlier content of a file: where it came from and how to read it."""

    version: str
    layer: AssetLayer
    source: Source


def make_deltas(
    req: DeltaRequest,
    inputs: ReleaseInputs,
    blobs: Mapping[str, Blob],
    version: str,
    work_dir: Path,
    options: RegistryOptions | None = None,
    progress: Progress | None = None,
) -> dict[str, tuple[PatchFile, ...]]:
    """Layer title -> its patches (possibly none), made in `work_dir/delta`."""
    return run_async(_make_deltas(req, inputs, blobs, version, work_dir, options, progress))


async def _make_deltas(
    req: DeltaRequest,
    inputs: ReleaseInputs,
    blobs: Mapping[str, Blob],
    version: str,
    work_dir: Path,
    options: RegistryOptions | None,
    progress: Progress | None,
) -> dict[str, tuple[PatchFile, ...]]:
    wanted = {
        name: blob
        for name, blob in blobs.items()
        if name.endswith(catalog.ZST) and blob.content_size >= MIN_DELTA_SIZE
    }
    out: dict[str, list[PatchFile]] = {name: [] for name in blobs}
    if not wanted:
        return {}
    sources = [_open(text, options) for text in dict.fromkeys(req.sources)]
    folder = work_dir / "delta"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        bases = await _bases(sources, req.versions, version, set(wanted))
        raw = {f.spec.name: f.path for f in inputs.files if not f.precompressed}
        for name, blob in wanted.items():
            seen: set[str] = {blob.content_digest}
            for base in bases.get(name, ()):
                if base.layer.content_digest in seen or len(out[name]) >= MAX_PATCHES:
                    continue
                seen.add(base.layer.content_digest)
                try:
                    made = await _patch_for(base, name, blob, raw.get(name), folder, req.level)
                except (AssetError, OSError, PatchError, DeltaUnavailable) as exc:
                    log.warning(
                        "no patch for %s from %s: %s", name, base.version, exc, extra={"file": name}
                    )
                    continue
                if progress is not None:
                    progress.start(f"patch {name} from {base.version}", 1)
                    progress.finish(f"patch {name} from {base.version}")
                if made is not None:
                    out[name].append(made)
    finally:
        await asyncio.gather(*(s.aclose() for s in sources), return_exceptions=True)
    return {name: tuple(files) for name, files in out.items() if files}


async def _bases(
    sources: Sequence[Source], versions: Sequence[str] | None, current: str, names: set[str]
) -> dict[str, list[_Base]]:
    """Title -> the earlier layers of that title, newest release first."""
    found: dict[str, list[_Base]] = {}
    done: set[str] = set()
    for source in sources:
        try:
            chosen = versions if versions is not None else await _last_versions(source, current)
        except AssetNotFoundError:
            log.info("no earlier release in %s: no patches from it", source.name)
            continue
        except AssetError as exc:
            log.warning("cannot list releases of %s for deltas: %s", source.name, exc)
            continue
        for old in chosen:
            if old in done or old == current:
                continue
            try:
                layers = await _layers_of(source, old)
            except AssetNotFoundError:
                continue  # another source may have it
            except AssetError as exc:
                log.warning("no deltas from %s %s: %s", source.name, old, exc)
                continue
            done.add(old)
            for layer in layers:
                if layer.title in names:
                    found.setdefault(layer.title, []).append(_Base(old, layer, source))
    missing = [v for v in versions or () if v not in done and v != current]
    if missing:
        log.warning("no earlier release %s found for deltas", ", ".join(missing))
    return found


async def _last_versions(source: Source, current: str) -> list[str]:
    tags = await source.list_tags()
    older = [
        v
        for v in (version_of_tag(t) for t in tags if t.startswith("v"))
        if v is not None and version_key(v) < version_key(current)
    ]
    older.sort(key=version_key, reverse=True)
    return older[:DEFAULT_DELTA_RELEASES]


async def _layers_of(source: Source, version: str) -> list[AssetLayer]:
    """Every layer of every platform of `version` (distinct by digest)."""
    tag = tag_for(version)
    data = await source.index(tag)
    index = Index.from_bytes(data, f"{source.name}:{tag}")
    layers: dict[str, AssetLayer] = {}
    for desc in index.manifests:
        manifest = Manifest.from_bytes(await source.manifest(desc), f"{source.name} {desc.digest}")
        for layer in read_asset_layers(manifest, f"{source.name} {desc.digest}").values():
            layers.setdefault(layer.digest, layer)
    return list(layers.values())


async def _patch_for(
    base: _Base, name: str, blob: Blob, raw: Path | None, folder: Path, level: int
) -> PatchFile | None:
    old = await _content_of(base, folder)
    new = raw if raw is not None else await asyncio.to_thread(_decompressed, blob, folder)
    return await asyncio.to_thread(_make, old, base, new, name, blob, folder, level)


def _make(
    old: Path, base: _Base, new: Path, name: str, blob: Blob, folder: Path, level: int
) -> PatchFile | None:
    tmp = folder / f".patch-{os.getpid()}.tmp"
    with old.open("rb") as o, new.open("rb") as n, tmp.open("wb") as p:
        make_patch(o, n, p, level)
    try:
        size = tmp.stat().st_size
        digest = _file_digest(tmp)
        check = _decoded_digest(old, tmp, blob.content_size)
        if check != blob.content_digest:
            raise AssetChecksumError(f"patch for {name}", blob.content_digest, check, str(old))
        if size >= blob.size * _WORTH:
            log.info(
                "patch for %s from %s is %d bytes, the layer %d: not published",
                name,
                base.version,
                size,
                blob.size,
            )
            return None
        final = folder / f"patch-{digest.partition(':')[2]}.zst"
        tmp.replace(final)
    finally:
        tmp.unlink(missing_ok=True)
    log.info(
        "patch for %s from %s: %d bytes (layer %d)",
        name,
        base.version,
        size,
        blob.size,
        extra={"file": name, "from": base.layer.content_digest, "patch": digest},
    )
    patch = Patch(base.layer.content_digest, base.layer.content_size, digest, size)
    return PatchFile(name, patch, final)


def _decoded_digest(old: Path, patch: Path, cap: int) -> str:
    from exec_sandbox_assets.release.patchcodec import apply_patch

    hasher = hashlib.sha256()
    with old.open("rb") as o, patch.open("rb") as p:
        apply_patch(o, p, hasher.update, cap)
    return f"sha256:{hasher.hexdigest()}"


def _file_digest(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            hasher.update(block)
    return f"sha256:{hasher.hexdigest()}"


async def _content_of(base: _Base, folder: Path) -> Path:
    """The earlier layer decompressed into `folder` (kept for re-runs), its digests
    checked here: the blob's against the layer, the content's against the annotation."""
    layer = base.layer
    final = folder / f"content-{layer.content_digest.partition(':')[2]}"
    if final.exists():
        return final
    tmp_blob = folder / f".blob-{os.getpid()}.tmp"
    try:
        hasher = hashlib.sha256()
        with tmp_blob.open("wb") as f:
            async with base.source.opener(layer)(0) as chunks:
                async for chunk in chunks:
                    hasher.update(chunk)
                    f.write(chunk)
        actual = f"sha256:{hasher.hexdigest()}"
        if actual != layer.digest:
            raise AssetChecksumError(layer.title, layer.digest, actual, base.source.name)
        await asyncio.to_thread(_decompress_to, tmp_blob, final, layer.content_digest, layer.title)
    finally:
        tmp_blob.unlink(missing_ok=True)
    return final


def _decompressed(blob: Blob, folder: Path) -> Path:
    """The new file's content, for a layer given pre-compressed."""
    final = folder / f"content-{blob.content_digest.partition(':')[2]}"
    if not final.exists():
        _decompress_to(blob.path, final, blob.content_digest, blob.path.name)
    return final


def _decompress_to(src: Path, final: Path, content_digest: str, what: str) -> None:
    import zstandard

    tmp = final.with_name(f".{final.name}-{os.getpid()}.tmp")
    hasher = hashlib.sha256()
    try:
        with src.open("rb") as fin, tmp.open("wb") as fout:
            reader = zstandard.ZstdDecompressor(max_window_size=1 << 31).stream_reader(
                fin, read_across_frames=True
            )
            while block := reader.read(CHUNK):
                hasher.update(block)
                fout.write(block)
        actual = f"sha256:{hasher.hexdigest()}"
        if actual != content_digest:
            raise AssetChecksumError(f"decompressed {what}", content_digest, actual, str(src))
        tmp.replace(final)
    finally:
        tmp.unlink(missing_ok=True)


# -- where earlier releases are read -----------------------------------------------------


def _open(text: str, options: RegistryOptions | None) -> Source:
    path = Path(text)
    if ":" not in text.split("/")[0] and path.is_dir() and (path / RELEASE_INDEX_FILE).is_file():
        return FolderSource(path)
    from exec_sandbox_assets.config import docker_config_path
    from exec_sandbox_assets.oci.auth import Credentials
    from exec_sandbox_assets.sources import open_source

    ref = parse_source_ref(text)
    credentials = None
    if options is not None and options.username and not isinstance(ref, LayoutRef):
        credentials = Credentials(options.username, options.password or "")
    return open_source(
        text,
        ref,
        docker_config=docker_config_path(),
        ca_bundle=options.ca_bundle if options else None,
        credentials=credentials,
        policy=TransferPolicy(),
    )


class FolderSource(Source):
    """A release folder (docs/format.md §6) on this machine: one release's files."""

    local = True

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = f"release folder {path}"
        self.key = f"folder-{path}"

    async def list_tags(self) -> list[str]:
        return [tag_for(self.version())]

    def version(self) -> str:
        data = (self.path / RELEASE_INDEX_FILE).read_bytes()
        index = Index.from_bytes(data, self.name)
        return index.annotations.get(catalog.ANN_VERSION, "")

    async def _index(self, tag: str) -> bytes:
        data = (self.path / RELEASE_INDEX_FILE).read_bytes()
        if tag_for(self.version()) != tag:
            raise AssetNotFoundError(f"{self.name} holds {self.version()}, not {tag}")
        return data

    async def _manifest(self, desc: Descriptor) -> bytes:
        for path in self._manifest_files():
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() == desc.digest.partition(":")[2]:
                return data
        raise AssetNotFoundError(f"{self.name}: no manifest {desc.digest}")

    def _manifest_files(self) -> Iterable[Path]:
        return sorted(
            p
            for p in self.path.glob("oci-manifest-*.json")
            if p.stat().st_size <= MAX_MANIFEST_SIZE
        )

    async def _signature(self, index_digest: str) -> bytes:
        raise AssetNotFoundError(f"{self.name}: signatures are not read for deltas")

    async def _payload(self, layer: SignatureLayer, n: int) -> bytes:
        raise AssetNotFoundError(f"{self.name}: signatures are not read for deltas")

    @contextlib.asynccontextmanager
    async def _open(self, layer: AssetLayer, offset: int) -> AsyncIterator[AsyncIterator[bytes]]:
        path = self.path / catalog.check_title(layer.title)
        try:
            f = path.open("rb")
        except FileNotFoundError:
            raise AssetNotFoundError(f"{self.name}: no {layer.title}") from None
        with f:
            f.seek(offset)

            async def chunks() -> AsyncIterator[bytes]:
                while block := f.read(CHUNK):
                    yield block

            yield chunks()


# -- what the targets get ------------------------------------------------------------------


def push_patches(target: Target, patches: Sequence[PatchFile], built: BuiltRelease) -> None:
    """The patch blobs the release's manifests name (before the manifests)."""
    named = {
        p.digest
        for data in built.manifests.values()
        for p in manifest_patches(Manifest.from_bytes(data, "built manifest"), "built manifest")
    }
    for file in {p.patch.digest: p for p in patches}.values():
        if file.patch.digest in named:
            target.push_blob(file.path, file.patch.digest, file.patch.size)


def keep_patches_alive(target: Target, built: BuiltRelease) -> None:
    """For each platform manifest naming patches, the referrer that keeps them alive
    (after the manifest it refers to, before the index)."""
    for data in built.manifests.values():
        keepalive = keepalive_manifest(data, "built manifest")
        if keepalive is not None:
            target.put_referrer(keepalive, MEDIA_TYPE_MANIFEST, sha256_digest(data))


__all__ = [
    "DEFAULT_DELTA_RELEASES",
    "PATCH_LEVEL",
    "DeltaRequest",
    "FolderSource",
    "PatchFile",
    "keep_patches_alive",
    "make_deltas",
    "push_patches",
]
