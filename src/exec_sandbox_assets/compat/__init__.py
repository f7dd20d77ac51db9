"""exec-sandbox 0.22.0's `exec_sandbox.assets`, on signed OCI assets (docs/compat.md).

The one-line switch, as the whole of exec-sandbox's `exec_sandbox/assets.py`:

    from exec_sandbox_assets.compat import install; install(__name__, __file__)

`install` makes this module *be* `exec_sandbox.assets` (sys.modules), with that file's
path as `__file__`, so the app's source tree (`images/dist/`, `gvproxy-wrapper/bin/`)
is found exactly where 0.22.0 looked, and `patch("exec_sandbox.assets.X")` reaches the
names these functions use. Same names, signatures, defaults, return types; errors are
exec-sandbox's own classes when exec-sandbox is importable (`translate`).

What it keeps from 0.22.0: the search order (override, EXEC_SANDBOX_IMAGES_DIR, the app's
`images/dist/`, the download cache), the environment read on every call, the asset
version `v{exec_sandbox.__version__}` (a `.dev` version means `latest`), the PVH kernel
preference, gvproxy fetched only by `ensure_assets_available`/`fetch_gvproxy`.
What it does not keep (deliberate, docs/compat.md): a file in the download cache is
trusted only once verified against the signed release (0.22.0's own files are adopted
by hash online, used with a warning offline); no release without a signature unless
EXEC_SANDBOX_ALLOW_LEGACY_RELEASES=1; EXEC_SANDBOX_CACHE_DIR still gets one
subdirectory per version.

New code should use the typed API of `exec_sandbox_assets` instead.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import threading
from collections.abc import Coroutine, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from exec_sandbox_assets import PrefetchResult
from exec_sandbox_assets.base.errors import (
    AssetError,
    AssetsNotFoundLocally,
)
from exec_sandbox_assets.cache import legacy
from exec_sandbox_assets.client import AssetClient
from exec_sandbox_assets.compat.registry import CompatAssets
from exec_sandbox_assets.compat.translate import translate, translating
from exec_sandbox_assets.config import Settings, load_settings
from exec_sandbox_assets.release import catalog

logger = logging.getLogger(__name__)

__all__ = [
    "PrefetchResult",
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
    "prefetch_all_assets",
]

GITHUB_OWNER = catalog.GITHUB_OWNER
GITHUB_REPO = catalog.GITHUB_REPO
APP_DISTRIBUTION = "exec-sandbox"
APP_MODULE = "exec_sandbox"


def install(name: str = f"{APP_MODULE}.assets", file: str | None = None) -> ModuleType:
    """Make this module the app's `assets` module (the one-line switch).

    `file` (the replaced module's `__file__`) roots the development paths in the app's tree.
    Also usable before exec-sandbox is imported: `install()` then `import exec_sandbox`.
    """
    global __file__  # the app's path: 0.22.0 derived its repository root from it
    module = sys.modules[__name__]
    if file is not None:
        __file__ = file
    sys.modules[name] = module
    parent_name, _, child = name.rpartition(".")
    if (parent := sys.modules.get(parent_name)) is not None:
        setattr(parent, child, module)
    return module


# --------------------------------------------------------------------------- settings


@functools.cache
def _installed_app_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(APP_DISTRIBUTION)
    except PackageNotFoundError:
        return None


def _app_version() -> str | None:
    """exec_sandbox.__version__ (read when asked: the app may still be importing)."""
    app = sys.modules.get(APP_MODULE)
    value = getattr(app, "__version__", None)
    return value if isinstance(value, str) else _installed_app_version()


def _app_root() -> Path:
    """The app's repository root, as 0.22.0 computed it from its assets module's path."""
    return Path(__file__).parent.parent.parent


def _settings() -> Settings:
    """Settings as of now: the environment (read on each call, as 0.22.0 did), the app's
    version and source tree."""
    root = _app_root()
    return load_settings(
        app_version=_app_version(),
        local_build_dir=root / "images" / "dist",
        gvproxy_build_dir=root / "gvproxy-wrapper" / "bin",
    )


def _local() -> AssetClient:
    """A client for lookups only (no network), independent of `get_assets()`, which
    callers may replace to stub downloads. The settings are read on each call; a client
    is built once per distinct settings, so its store keeps its record memo and the
    trusted keys' ids are not re-read on every warm call."""
    return _client_for(_settings())


@functools.lru_cache(maxsize=8)
def _client_for(settings: Settings) -> AssetClient:
    return AssetClient(settings)


# The seed-compatible singleton: reset to None to start afresh (exec-sandbox's tests do).
_assets_singleton: CompatAssets | None = None
_assets_lock = threading.Lock()


def get_assets() -> CompatAssets:
    """Get or create the assets registry singleton (thread-safe)."""
    global _assets_singleton  # the seed-compatible singleton
    if _assets_singleton is None:
        with _assets_lock:
            if _assets_singleton is None:
                _assets_singleton = CompatAssets(_settings)
    return _assets_singleton


def is_offline_mode() -> bool:
    """Check if offline mode is enabled via environment variable (read on each call)."""
    try:
        return _settings().offline
    except AssetError as exc:
        raise translate(exc) from exc


def _get_asset_version() -> tuple[str, str]:
    """(version, release tag): EXEC_SANDBOX_ASSET_VERSION, else the app's version."""
    settings = _settings()
    return settings.version, settings.tag


def _versioned_cache_dir() -> Path:
    """The cache directory of the asked release (the cache root while `latest` is unresolved)."""
    client = _local()
    version = client.cached_version()
    return client.store.version_dir(version) if version else client.settings.cache_dir


def get_current_arch() -> str:
    return catalog.host_arch()


def get_gvproxy_suffix() -> str:
    os_, goarch = catalog.host_platform()
    return f"{os_}-{goarch}"


# --------------------------------------------------------------------------- lookups


def _get_search_paths(override: Path | None = None) -> list[Path]:
    """override, EXEC_SANDBOX_IMAGES_DIR, the app's images/dist/, the download cache."""
    settings = _settings()
    paths = [p for p in (override, settings.images_dir, settings.local_build_dir) if p]
    paths.append(_versioned_cache_dir())
    return paths


async def _find_images_dir(override: Path | None = None) -> Path | None:
    """The first search path that exists."""
    for path in _get_search_paths(override):
        if path.exists():
            return path
    return None


def _cached(name: str) -> Path | None:
    """A verified cache file; offline also a file 0.22.0 left (unverified, with a warning)."""
    client = _local()
    if (hit := client.find_cached(name)) is not None:
        return hit
    if not client.settings.offline:
        return None  # online, a legacy file is adopted by hash when fetched
    found = legacy.find_unverified([_versioned_cache_dir(), *client.settings.legacy_dirs], name)
    if found is not None:
        get_assets().warn_unverified(found.parent)
    return found


def _search(names: Sequence[str], override: Path | None = None) -> Path | None:
    """Directory by directory (in priority order), each of `names` in order."""
    *local, _cache = _get_search_paths(override)
    for directory in local:
        for name in names:
            if (directory / name).exists():
                return directory / name
    for name in dict.fromkeys(n.removesuffix(catalog.ZST) for n in names):
        if (hit := _cached(name)) is not None:
            return hit
    return None


async def _find_asset(fname: str, override: Path | None = None) -> Path | None:
    """Find an asset without downloading; also accepts its decompressed name (no `.zst`)."""
    names = [fname, fname.removesuffix(catalog.ZST)] if fname.endswith(catalog.ZST) else [fname]
    return _search(names, override)


def _kernel_candidates(arch: str) -> list[str]:
    """Kernel file names in preference order (PVH vmlinux first on x86_64; `.zst` first)."""
    return [n for spec in catalog.kernels(arch) for n in (spec.name, spec.output_name)]


def _base_image_name(language: str, arch: str) -> str:
    known = {lang.value for lang in catalog.Language}
    return catalog.base_image(language if language in known else "raw", arch).name


# --------------------------------------------------------------------------- fetches


@translating
async def ensure_registry_loaded() -> None:
    """Load the verified release's file list (a no-op offline, without local layouts)."""
    assets = get_assets()
    if assets.registry:
        return
    if is_offline_mode() and not _local_sources():
        logger.debug("Offline mode enabled, skipping registry load")
        return
    _, tag = _get_asset_version()
    logger.info("Loading asset registry", extra={"version": tag})
    await assets.load_registry_from_github(GITHUB_OWNER, GITHUB_REPO, tag)


def _local_sources() -> bool:
    """`oci:` layouts (and archives) are on this machine: usable offline."""
    return any(m.startswith(("oci:", "oci-archive:")) for m in _settings().mirrors)


@translating
async def fetch_kernel(arch: str | None = None, override: Path | None = None) -> Path:
    """Fetch the kernel; on x86_64 the PVH vmlinux is preferred when available."""
    arch = arch or get_current_arch()
    candidates = _kernel_candidates(arch)
    if (path := _search(candidates, override)) is not None:
        logger.debug("Using cached kernel", extra={"arch": arch, "path": str(path)})
        return path
    await ensure_registry_loaded()
    assets = get_assets()
    download = [n for n in candidates if n.endswith(catalog.ZST)]
    for name in download:
        if name in assets.registry:
            return await assets.fetch(name)
    return await assets.fetch(download[-1])


async def _fetch_named(fname: str, override: Path | None, what: str) -> Path:
    if (path := await _find_asset(fname, override)) is not None:
        logger.debug("Using cached %s", what, extra={"path": str(path)})
        return path
    await ensure_registry_loaded()
    logger.debug("Fetching %s", what, extra={"file": fname})
    return await get_assets().fetch(fname)


@translating
async def fetch_initramfs(arch: str | None = None, override: Path | None = None) -> Path:
    """Fetch the initramfs for `arch` (default: this machine)."""
    arch = arch or get_current_arch()
    return await _fetch_named(catalog.initramfs(arch).name, override, "initramfs")


@translating
async def fetch_base_image(
    language: str, arch: str | None = None, override: Path | None = None
) -> Path:
    """Fetch the qcow2 base image of `language` (python, javascript; anything else: raw)."""
    arch = arch or get_current_arch()
    return await _fetch_named(_base_image_name(language, arch), override, "base image")


@translating
async def get_gvproxy_path(override: Path | None = None) -> Path | None:
    """gvproxy-wrapper for this host without downloading: override, the app's
    gvproxy-wrapper/bin/ (development builds), then as `_find_asset`."""
    fname = f"gvproxy-wrapper-{get_gvproxy_suffix()}"
    if override and (override / fname).exists():
        return override / fname
    dev = _settings().gvproxy_build_dir
    if dev is not None and (dev / fname).exists():
        return dev / fname
    return await _find_asset(fname, override)


def _make_executable(path: Path) -> None:
    mode = path.stat().st_mode
    if mode & 0o111 != 0o111:
        path.chmod(mode | 0o111)


@translating
async def fetch_gvproxy(override: Path | None = None) -> Path:
    """Fetch gvproxy-wrapper for this host (made executable)."""
    if (local := await get_gvproxy_path(override)) is not None:
        _make_executable(local)
        return local
    await ensure_registry_loaded()
    path = await get_assets().fetch(f"gvproxy-wrapper-{get_gvproxy_suffix()}")
    _make_executable(path)
    return path


async def _gather(tasks: Sequence[Coroutine[Any, Any, Path]]) -> list[Path]:
    """Every fetch runs to its end (complete or resumable) before the first error is raised."""
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return [r for r in results if isinstance(r, Path)]


@translating
async def ensure_assets_available(
    language: str | None = None,
    override: Path | None = None,
) -> tuple[Path, Path]:
    """Kernel, initramfs and gvproxy (and `language`'s base image): (images_dir, gvproxy).

    Raises AssetNotFoundError, AssetDownloadError, AssetChecksumError (exec-sandbox's);
    offline with something missing, an AssetNotFoundError that is also a FileNotFoundError.
    """
    tasks = [
        fetch_kernel(override=override),
        fetch_initramfs(override=override),
        fetch_gvproxy(override=override),
    ]
    if language:
        tasks.append(fetch_base_image(language, override=override))
    kernel_path, _, gvproxy_path, *_ = await _gather(tasks)
    images_dir = kernel_path.parent
    logger.info("Assets ready", extra={"images_dir": str(images_dir), "gvproxy": str(gvproxy_path)})
    return images_dir, gvproxy_path


def _kernel_in(directory: Path, arch: str) -> Path | None:
    """The kernel `directory` offers. For the download cache, where the file really is:
    our version directory once verified, or (offline) the flat EXEC_SANDBOX_CACHE_DIR or
    `v{version}` directory 0.22.0 filled, as the fetch functions find it."""
    names = _kernel_candidates(arch)
    if directory == _versioned_cache_dir():
        found = (_cached(n) for n in names if not n.endswith(catalog.ZST))
        return next((p for p in found if p is not None), None)
    return next((directory / n for n in names if (directory / n).exists()), None)


@translating
async def ensure_assets(
    override: Path | None = None,
    download: bool = True,
    language: str | None = None,
) -> Path:
    """Find or download assets; returns the images directory.

    Raises FileNotFoundError when nothing is found and `download` is False, else as
    `ensure_assets_available`.
    """
    # As 0.22.0: the first search path that exists, if it holds a kernel. The cache counts
    # even when our version directory does not exist yet (0.22.0's files may).
    images_dir = await _find_images_dir(override) or _versioned_cache_dir()
    if (kernel := _kernel_in(images_dir, get_current_arch())) is not None:
        logger.debug("Found existing assets", extra={"images_dir": str(kernel.parent)})
        return kernel.parent
    logger.debug("No kernel in the images directory", extra={"images_dir": str(images_dir)})
    if not download:
        raise AssetsNotFoundLocally(
            "Assets",
            [str(p) for p in _get_search_paths(override)],
            "auto_download_assets=False: set EXEC_SANDBOX_IMAGES_DIR or enable "
            "auto_download_assets",
        )
    images_dir, _ = await ensure_assets_available(language, override)
    return images_dir


async def prefetch_all_assets(arch: str | None = None) -> PrefetchResult:
    """Download every asset of `arch` (kernel, initramfs, gvproxy, all base images) for
    offline use; one `errors` entry per file that failed, with its own message."""
    arch = arch or get_current_arch()
    logger.info("Prefetching all assets", extra={"arch": arch})
    try:
        await ensure_registry_loaded()
    except Exception as exc:  # reported, as 0.22.0 did, not raised
        logger.error("Failed to load registry", extra={"error": str(exc)})
        return PrefetchResult(success=False, arch=arch, errors=[("registry", str(exc))])
    labelled: list[tuple[str, Coroutine[Any, Any, Path]]] = [
        ("kernel", fetch_kernel(arch=arch)),
        ("initramfs", fetch_initramfs(arch=arch)),
        ("gvproxy", fetch_gvproxy()),
    ]
    labelled += [
        (f"{lang.value} base", fetch_base_image(lang.value, arch=arch)) for lang in catalog.Language
    ]
    results = await asyncio.gather(*(c for _, c in labelled), return_exceptions=True)
    downloaded: list[str] = []
    errors: list[tuple[str, str]] = []
    for (name, _), result in zip(labelled, results, strict=True):
        if isinstance(result, BaseException):
            if not isinstance(result, Exception):
                raise result  # cancellation is not a per-file failure
            logger.warning("Asset download failed", extra={"asset": name, "error": str(result)})
            errors.append((name, str(result)))
        else:
            downloaded.append(name)
    return PrefetchResult(
        success=not errors,
        arch=arch,
        downloaded=downloaded,
        errors=errors,
        cache_dir=_versioned_cache_dir() if not errors else None,
    )
