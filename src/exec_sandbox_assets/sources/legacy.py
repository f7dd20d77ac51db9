"""Releases exec-sandbox published before signed OCI assets: plain GitHub Release files.

Used only with EXEC_SANDBOX_ALLOW_LEGACY_RELEASES=1 (docs/compat.md). Trust is what
0.22.0 had, and no more: the file list and each file's SHA-256 come from the GitHub API
over TLS (`GET {api}/repos/{owner}/{repo}/releases/tags/{tag}`, or `/releases/latest`),
and each download is checked against that digest. Nobody signed anything; whoever controls
the repository's releases (or the API answer) controls what boots. Unlike 0.22.0, a file
the API gives no digest for is refused, not accepted unchecked.

This is not a `Source`: a `Source` serves a signed OCI index, and a legacy release has
none. The store still downloads by digest (resumable), decompresses, and records the
decompressed content's digest, so later boots are a stat like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exec_sandbox_assets.base import safejson
from exec_sandbox_assets.base.errors import AssetNotFoundError, FormatError
from exec_sandbox_assets.cache.records import LEGACY_GITHUB_DIGEST
from exec_sandbox_assets.cache.store import BlobRequest, OutputSpec
from exec_sandbox_assets.config import LATEST, Settings
from exec_sandbox_assets.release import catalog
from exec_sandbox_assets.release.catalog import AssetSpec, Kind

if TYPE_CHECKING:
    from exec_sandbox_assets.client import AssetClient
    from exec_sandbox_assets.oci.http import HttpCore

log = logging.getLogger(__name__)

MAX_RELEASE_JSON = 4 * 1024 * 1024
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class LegacyAsset:
    name: str
    url: str
    digest: str
    size: int


@dataclass(frozen=True)
class LegacyRelease:
    """One GitHub release as the API described it: its tag and its files with digests."""

    tag: str
    api_url: str
    assets: Mapping[str, LegacyAsset]

    @property
    def version(self) -> str:
        return self.tag.removeprefix("v")


def release_api_url(settings: Settings) -> str:
    base = f"{settings.github_api_url}/repos/{catalog.GITHUB_OWNER}/{catalog.GITHUB_REPO}"
    return (
        f"{base}/releases/latest" if settings.floating else f"{base}/releases/tags/{settings.tag}"
    )


def parse_release(data: bytes, where: str) -> LegacyRelease:
    """The API's release JSON -> tag and files. Files without a usable digest are left out
    (logged): a legacy release is only as good as the digests GitHub computed."""
    obj: Any = safejson.loads(data, where, what="GitHub release JSON")
    if not isinstance(obj, dict) or not isinstance(obj.get("tag_name"), str):
        raise FormatError("not a GitHub release (no tag_name)", where)
    tag = obj["tag_name"]
    if not catalog.is_valid_title(tag):
        raise FormatError(f"invalid tag_name {tag!r}", where)
    assets: dict[str, LegacyAsset] = {}
    for entry in obj.get("assets") or []:
        if not isinstance(entry, dict):
            raise FormatError("assets must be objects", where)
        name, url = entry.get("name"), entry.get("browser_download_url")
        digest, size = entry.get("digest"), entry.get("size")
        if not (isinstance(name, str) and catalog.is_valid_title(name)):
            raise FormatError(f"invalid asset name {name!r}", where)
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            raise FormatError(f"asset {name}: invalid browser_download_url {url!r}", where)
        if not (isinstance(digest, str) and _DIGEST_RE.match(digest)):
            log.warning(
                "legacy release file without a sha256 digest is not used",
                extra={"asset": name, "release": where},
            )
            continue
        if type(size) is not int or size < 0:
            raise FormatError(f"asset {name}: invalid size {size!r}", where)
        assets[name] = LegacyAsset(name, url, digest, size)
    return LegacyRelease(tag, where, assets)


def _http(settings: Settings) -> HttpCore:
    from exec_sandbox_assets.oci.http import HttpCore

    return HttpCore(peer="GitHub", ca_bundle=settings.ca_bundle, policy=settings.transfer_policy())


async def load_release(settings: Settings) -> LegacyRelease:
    """Read the release description from the GitHub API (404: AssetNotFoundError)."""
    url = release_api_url(settings)
    headers = {"Accept": "application/vnd.github+json", "Accept-Encoding": "identity"}
    if settings.github_token:
        headers["Authorization"] = f"Bearer {settings.github_token}"
    http = _http(settings)
    try:
        _response, data = await http.read("GET", url, headers, MAX_RELEASE_JSON)
    finally:
        await http.aclose()
    release = parse_release(data, url)
    log.warning(
        "using legacy release %s: no signature, trust is TLS and the GitHub API digest only",
        release.tag,
        extra={"release": url, "files": len(release.assets)},
    )
    return release


def _content_digest(blob: Path, compressed: bool) -> tuple[str, int]:
    """Digest and size of the file the scheduler will read (decompressed when `.zst`)."""
    digest = hashlib.sha256()
    size = 0
    with blob.open("rb") as f:
        if compressed:
            import zstandard

            reader = zstandard.ZstdDecompressor(max_window_size=1 << 31).stream_reader(f)
            while chunk := reader.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        else:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
    return f"sha256:{digest.hexdigest()}", size


async def fetch(client: AssetClient, release: LegacyRelease, spec: AssetSpec) -> Path:
    """Download `spec` from the legacy release (checked against the API digest) and install
    it in the cache with its decompressed digest recorded."""
    asset = release.assets.get(spec.name)
    if asset is None:
        raise AssetNotFoundError(
            f"legacy release {release.tag} ({release.api_url}) has no {spec.name} with a "
            f"digest; it has: {', '.join(sorted(release.assets)) or 'nothing'}"
        )
    store = client.store
    found = store.lookup(release.version, spec.output_name)
    if found is not None:
        return found
    http = _http(client.settings)
    source = f"legacy GitHub release {release.tag}"

    @contextlib.asynccontextmanager
    async def opener(offset: int) -> AsyncIterator[AsyncIterator[bytes]]:
        from exec_sandbox_assets.sources.base import _skip

        async with http.open_stream(asset.url, offset) as stream:
            yield _skip(stream.chunks(), offset - stream.offset)

    try:
        blob = await store.fetch_blob(BlobRequest(asset.digest, asset.size, source), opener)
        digest, size = await asyncio.to_thread(_content_digest, blob, spec.compressed)
        out = OutputSpec(
            version=release.version,
            name=spec.output_name,
            layer_digest=asset.digest,
            layer_size=asset.size,
            compressed=spec.compressed,
            content_digest=digest,
            content_size=size,
            executable=spec.kind is Kind.GVPROXY,
            source=source,
            verified_by=(LEGACY_GITHUB_DIGEST,),
        )
        path = await store.ensure(out, opener)
    finally:
        await http.aclose()
    if client.settings.version == LATEST:
        from exec_sandbox_assets.cache.refs import FLOATING_REF_PREFIX

        store.write_state(
            FLOATING_REF_PREFIX + LATEST, {"version": release.version, "digest": "legacy"}
        )
    return path


__all__ = ["LegacyAsset", "LegacyRelease", "fetch", "load_release", "parse_release"]
