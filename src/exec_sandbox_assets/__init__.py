"""exec-sandbox VM assets, distributed as signed OCI artifacts.

This is the typed API for new code. The drop-in for exec-sandbox 0.22.0's own
`exec_sandbox.assets` (its defaults, search order, exception classes) is
`exec_sandbox_assets.compat` (docs/compat.md). The names here follow the original module:

    from exec_sandbox_assets import ensure_assets, fetch_kernel, ...

Resolution order (docs/format.md §7): explicit override dir, EXEC_SANDBOX_IMAGES_DIR,
the local build dir `images/dist/`, the verified cache, then OCI registries (mirrors
first, `oci:` layouts count as registries), then GitHub Releases. Everything remote is
verified (signature, then digests) before it is decompressed or made visible.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exec_sandbox_assets.base.errors import (
    AllSourcesFailedError,
    AssetChecksumError,
    AssetDownloadError,
    AssetError,
    AssetNotFoundError,
    AssetsNotFoundLocally,
    ConfigError,
    SignatureError,
    TransportError,
    TrustError,
)
from exec_sandbox_assets.client import AssetClient
from exec_sandbox_assets.config import Settings, load_settings
from exec_sandbox_assets.release import catalog
from exec_sandbox_assets.release.catalog import AssetSpec, Language

__version__ = "0.1.0"

logger = logging.getLogger(__name__)

__all__ = [
    "AllSourcesFailedError",
    "AssetChecksumError",
    "AssetClient",
    "AssetDownloadError",
    "AssetError",
    "AssetNotFoundError",
    "AssetsNotFoundLocally",
    "ConfigError",
    "PrefetchResult",
    "Settings",
    "SignatureError",
    "TransportError",
    "TrustError",
    "configure",
    "ensure_assets",
    "ensure_assets_available",
    "ensure_registry_loaded",
    "fetch_base_image",
    "fetch_gvproxy",
    "fetch_initramfs",
    "fetch_kernel",
    "get_assets",
    "get_gvproxy_path",
    "is_offline_mode",
    "load_settings",
    "prefetch_all_assets",
]


@dataclass
class PrefetchResult:
    """Result of prefetch_all_assets operation."""

    success: bool
    arch: str
    downloaded: list[str] = field(default_factory=lambda: [])
    errors: list[tuple[str, str]] = field(default_factory=lambda: [])
    cache_dir: Path | None = None


# The seed-compatible singleton: the one global, built from the environment on first use.
_assets_singleton: AssetClient | None = None
_assets_lock = threading.Lock()


def get_assets() -> AssetClient:
    """Get or create the process-wide client (settings read from the environment once)."""
    global _assets_singleton  # the seed-compatible singleton
    if _assets_singleton is None:
        with _assets_lock:
            if _assets_singleton is None:
                _assets_singleton = AssetClient(load_settings())
    return _assets_singleton


def configure(settings: Settings | None = None, **explicit: Any) -> AssetClient:
    """Replace the process-wide client: explicit arguments win over the environment.

    `configure(version="0.22.0", mirrors=("http://10.0.0.5:5000/assets",))`, or pass
    a ready `Settings`. `configure()` re-reads the environment.
    """
    global _assets_singleton  # the seed-compatible singleton
    client = AssetClient(settings if settings is not None else load_settings(**explicit))
    with _assets_lock:
        _assets_singleton = client
    return client


def is_offline_mode() -> bool:
    """True when EXEC_SANDBOX_OFFLINE=1 (read once, with the other settings)."""
    return get_assets().settings.offline


async def ensure_registry_loaded() -> None:
    """Resolve and verify the release index for this host (a no-op when offline)."""
    client = get_assets()
    if client.settings.offline:
        logger.debug("Offline mode enabled, skipping release index load")
        return
    from exec_sandbox_assets.sources import build_sources

    sources = build_sources(client.settings)
    try:
        await client.platform_release(
            sources, (client.settings.host_os, client.settings.host_goarch)
        )
    finally:
        await asyncio.gather(*(s.aclose() for s in sources), return_exceptions=True)


def _arch(arch: str | None) -> str:
    return catalog.check_arch(arch) if arch else catalog.host_arch()


def _host_gvproxy() -> AssetSpec:
    settings = get_assets().settings
    return catalog.gvproxy(settings.host_os, settings.host_goarch)


async def _fetch_single(spec: AssetSpec, override: Path | None) -> Path:
    """An explicit override is authoritative: a file it lacks is reported, not fetched."""
    if override is not None:
        if (path := override / spec.output_name).is_file():
            return path
        raise AssetsNotFoundLocally(
            spec.output_name, [str(override)], "images_dir was given explicitly"
        )
    path = (await get_assets().fetch([spec]))[spec.output_name]
    logger.debug("asset ready", extra={"asset": spec.output_name, "path": str(path)})
    return path


async def fetch_kernel(arch: str | None = None, override: Path | None = None) -> Path:
    """Path to the decompressed kernel (`vmlinuz-{arch}`), fetching it if needed."""
    return await _fetch_single(catalog.kernel(_arch(arch)), override)


async def fetch_initramfs(arch: str | None = None, override: Path | None = None) -> Path:
    """Path to the decompressed initramfs (`initramfs-{arch}`), fetching it if needed."""
    return await _fetch_single(catalog.initramfs(_arch(arch)), override)


async def fetch_base_image(
    language: str, arch: str | None = None, override: Path | None = None
) -> Path:
    """Path to the decompressed qcow2 base image for `language` (python, javascript, raw)."""
    return await _fetch_single(catalog.base_image(language, _arch(arch)), override)


async def get_gvproxy_path(override: Path | None = None) -> Path | None:
    """Path to the gvproxy-wrapper binary for this host, without downloading.

    Order: override, the repo's gvproxy-wrapper/bin (dev builds), EXEC_SANDBOX_IMAGES_DIR,
    images/dist, the verified cache.
    """
    name = _host_gvproxy().output_name
    client = get_assets()
    if override is not None and (override / name).is_file():
        return override / name
    dev = client.settings.gvproxy_build_dir
    if dev is not None and (dev / name).is_file():
        return dev / name
    return client.find(name, override)


async def fetch_gvproxy(override: Path | None = None) -> Path:
    """Path to the gvproxy-wrapper binary for this host (executable), fetching it if needed."""
    local = await get_gvproxy_path(override)
    if local is not None:
        _make_executable(local)
        return local
    # A host binary, not an image: an override that lacks it does not stop the fetch.
    # The cache installs it 0755 after verification.
    spec = _host_gvproxy()
    return (await get_assets().fetch([spec], use_local=False))[spec.output_name]


def _make_executable(path: Path) -> None:
    mode = path.stat().st_mode
    if mode & 0o111 != 0o111:
        path.chmod(mode | 0o111)


def _check_override(specs: list[AssetSpec], override: Path) -> None:
    """An explicit images_dir is authoritative for the VM files: report what it lacks."""
    missing = [s.output_name for s in specs if not (override / s.output_name).is_file()]
    if missing:
        raise AssetsNotFoundLocally(
            ", ".join(missing), [str(override)], "images_dir was given explicitly"
        )


def _vm_specs(language: str | None) -> list[AssetSpec]:
    arch = catalog.host_arch()
    specs = [catalog.kernel(arch), catalog.initramfs(arch)]
    if language:
        specs.append(catalog.base_image(language, arch))
    return specs


async def ensure_assets_available(
    language: str | None = None,
    override: Path | None = None,
) -> tuple[Path, Path]:
    """Ensure kernel, initramfs, gvproxy (and `language`'s base image) are available.

    Returns (images_dir, gvproxy_path); images_dir holds every VM file. Raises
    FileNotFoundError in offline mode when something is missing, and
    AssetNotFoundError / AssetDownloadError / AssetChecksumError / SignatureError
    when fetching fails. An explicit `override` must hold the VM files (as for
    `fetch_kernel`): what it lacks is reported, not fetched into another directory.
    """
    client = get_assets()
    specs = _vm_specs(language)
    if override is not None:
        _check_override(specs, override)
    images_dir = client.complete_dir(specs, override)
    gvproxy = await get_gvproxy_path(override)
    if images_dir is None or gvproxy is None:
        # One directory must hold every VM file: fetch all of them into the cache's
        # version directory (what is already there is reused, not downloaded again).
        wanted = ([] if images_dir else specs) + ([] if gvproxy else [_host_gvproxy()])
        paths = await client.fetch(wanted, use_local=False)
        if images_dir is None:
            images_dir = paths[specs[0].output_name].parent
        if gvproxy is None:
            gvproxy = paths[_host_gvproxy().output_name]
    _make_executable(gvproxy)
    logger.info("Assets ready", extra={"images_dir": str(images_dir), "gvproxy": str(gvproxy)})
    return images_dir, gvproxy


async def ensure_assets(
    override: Path | None = None,
    download: bool = False,
    language: str | None = None,
) -> Path:
    """Find or download assets; returns the directory holding every VM file.

    Checks kernel, initramfs and gvproxy (and `language`'s base image), not only the
    kernel. An explicit `override` must hold the VM files: what it lacks is reported,
    never silently fetched elsewhere (gvproxy, a host binary, is looked up and fetched
    as by `fetch_gvproxy`). Without `download`, a miss raises FileNotFoundError naming
    every place searched.
    """
    client = get_assets()
    specs = _vm_specs(language)
    if override is not None:
        _check_override(specs, override)
        images_dir: Path | None = override
    else:
        images_dir = client.complete_dir(specs)
    gvproxy = await get_gvproxy_path(override)
    if images_dir is not None and gvproxy is not None:
        logger.debug("Found existing assets", extra={"images_dir": str(images_dir)})
        return images_dir
    if not download or client.settings.offline:
        names = [] if images_dir else [s.output_name for s in specs]
        names += [] if gvproxy else [_host_gvproxy().output_name]
        why = (
            "offline mode (EXEC_SANDBOX_OFFLINE=1)"
            if client.settings.offline
            else "auto_download_assets=False: set EXEC_SANDBOX_IMAGES_DIR or enable downloads"
        )
        raise AssetsNotFoundLocally(", ".join(names), client.searched_places(override), why)
    # gvproxy is a host binary, not an image: fetched even when images_dir was given.
    images_dir, _ = await ensure_assets_available(language, override)
    return images_dir


async def prefetch_all_assets(arch: str | None = None) -> PrefetchResult:
    """Download every asset of `arch` (kernels, initramfs, all base images) plus this
    host's gvproxy, for offline use later (EXEC_SANDBOX_OFFLINE=1)."""
    arch = _arch(arch)
    client = get_assets()
    labelled: list[tuple[str, AssetSpec]] = [
        ("kernel", catalog.kernel(arch)),
        ("initramfs", catalog.initramfs(arch)),
        ("gvproxy", _host_gvproxy()),
    ]
    labelled += [(f"{lang.value} base", catalog.base_image(lang, arch)) for lang in Language]
    logger.info("Prefetching all assets", extra={"arch": arch})
    results = await client.fetch_each([spec for _, spec in labelled], use_local=False)
    downloaded: list[str] = []
    errors: list[tuple[str, str]] = []
    for label, spec in labelled:
        outcome = results[spec.output_name]
        if isinstance(outcome, BaseException):
            logger.warning("Asset download failed", extra={"asset": label, "error": str(outcome)})
            errors.append((label, str(outcome)))
        else:
            downloaded.append(label)
    version = client.cached_version()
    return PrefetchResult(
        success=not errors,
        arch=arch,
        downloaded=downloaded,
        errors=errors,
        cache_dir=client.store.version_dir(version) if version and not errors else None,
    )
