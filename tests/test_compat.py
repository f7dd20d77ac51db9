"""The compatibility layer in-process (no exec-sandbox installed here: our own error
classes pass through), files exec-sandbox 0.22.0 left behind, and legacy releases.

tests/test_compat_es022.py runs the same layer under exec-sandbox 0.22.0 itself.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import types
from collections.abc import Sequence
from pathlib import Path

import pytest

from conftest import FaultProxyFactory
from exec_sandbox_assets import AssetClient, compat, load_settings
from exec_sandbox_assets.base.errors import (
    AssetChecksumError,
    AssetNotFoundError,
    AssetsNotFoundLocally,
    ConfigError,
    ReleaseNotFoundError,
)
from exec_sandbox_assets.release import catalog
from releases import SampleRelease, publish_sample_release
from servers import RegistryServer, StaticServer

VERSION = "1.0.0"
ARCH = catalog.host_arch()
OS, GOARCH = catalog.host_platform()
INITRAMFS = f"initramfs-{ARCH}"
VMLINUZ = f"vmlinuz-{ARCH}"
GVPROXY = f"gvproxy-wrapper-{OS}-{GOARCH}"


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(compat, "_assets_singleton", None)
    monkeypatch.delitem(sys.modules, "exec_sandbox", raising=False)
    # The app's tree: nothing in images/dist or gvproxy-wrapper/bin unless a test puts it.
    monkeypatch.setattr(compat, "__file__", str(tmp_path / "app" / "src" / "app" / "assets.py"))


@pytest.fixture
def release(registry: RegistryServer, repo_name: str, tmp_path: Path) -> SampleRelease:
    return publish_sample_release(registry.ref(repo_name), VERSION, tmp_path / "work")


def use(monkeypatch: pytest.MonkeyPatch, source: str, release: SampleRelease, **env: str) -> None:
    values = {
        "EXEC_SANDBOX_REGISTRY": source,
        "EXEC_SANDBOX_AIRGAP": "1",
        "EXEC_SANDBOX_TRUSTED_KEYS": str(release.key.public),
        "EXEC_SANDBOX_ASSET_VERSION": VERSION,
        **env,
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def blob_gets(proxy_requests: Sequence[object], digest: str) -> int:
    return sum(
        1
        for r in proxy_requests
        if getattr(r, "method", "") == "GET" and getattr(r, "path", "").endswith(f"/blobs/{digest}")
    )


# --------------------------------------------------------------------------- legacy cache


def test_flat_legacy_cache_is_adopted_by_hash_and_a_mismatch_redownloaded(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    release: SampleRelease,
    registry: RegistryServer,
    repo_name: str,
    fault_proxy: FaultProxyFactory,
) -> None:
    """0.22.0 with EXEC_SANDBOX_CACHE_DIR kept files flat there: hashed, not downloaded."""
    flat = tmp_path / "flat-cache"
    flat.mkdir()
    shutil.copyfile(release.dist / VMLINUZ, flat / VMLINUZ)
    (flat / INITRAMFS).write_bytes(
        b"x" * len(release.expected(INITRAMFS))
    )  # right size, wrong bytes
    proxy = fault_proxy(registry)
    use(monkeypatch, proxy.ref(repo_name), release, EXEC_SANDBOX_CACHE_DIR=str(flat))
    client = AssetClient(load_settings())
    specs = [catalog.kernel(ARCH), catalog.initramfs(ARCH)]

    import asyncio

    paths = asyncio.run(client.fetch(specs, use_local=False))

    assert blob_gets(proxy.requests, release.layer(VMLINUZ).digest) == 0
    assert blob_gets(proxy.requests, release.layer(INITRAMFS).digest) == 1
    assert paths[VMLINUZ] == flat / f"v{VERSION}" / VMLINUZ
    assert paths[VMLINUZ].read_bytes() == release.expected(VMLINUZ)
    assert paths[INITRAMFS].read_bytes() == release.expected(INITRAMFS)
    # Recorded as verified: the next lookup is a stat.
    assert client.store.lookup(VERSION, VMLINUZ) == paths[VMLINUZ]
    assert (flat / INITRAMFS).read_bytes().startswith(b"x"), "the legacy file is left alone"


async def test_offline_legacy_files_are_used_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    flat = tmp_path / "flat-cache"
    flat.mkdir()
    for name in (VMLINUZ, INITRAMFS, GVPROXY):
        (flat / name).write_bytes(b"0.22.0 was here")
    monkeypatch.setenv("EXEC_SANDBOX_CACHE_DIR", str(flat))
    monkeypatch.setenv("EXEC_SANDBOX_OFFLINE", "1")
    monkeypatch.setenv("EXEC_SANDBOX_ASSET_VERSION", VERSION)
    caplog.set_level(logging.WARNING, logger="exec_sandbox_assets.compat")

    images_dir, gvproxy = await compat.ensure_assets_available()
    assert await compat.fetch_kernel() == flat / VMLINUZ
    assert images_dir == flat
    assert gvproxy == flat / GVPROXY and os.access(gvproxy, os.X_OK)
    warnings = [r for r in caplog.records if "without verifying them" in r.getMessage()]
    assert len(warnings) == 1, warnings


async def test_online_legacy_files_are_not_trusted_by_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Online, a bare file in the cache is no longer 'found': it is checked when fetched."""
    cache = tmp_path / "cache"
    (cache / f"v{VERSION}").mkdir(parents=True)
    (cache / f"v{VERSION}" / VMLINUZ).write_bytes(b"anything")
    monkeypatch.setenv("EXEC_SANDBOX_CACHE_DIR", str(cache))
    monkeypatch.setenv("EXEC_SANDBOX_ASSET_VERSION", VERSION)
    assert await compat._find_asset(VMLINUZ) is None
    with pytest.raises(FileNotFoundError):
        await compat.ensure_assets(download=False)


# --------------------------------------------------------------------------- behaviour


async def test_without_exec_sandbox_errors_are_ours(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("EXEC_SANDBOX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("EXEC_SANDBOX_OFFLINE", "1")
    with pytest.raises(AssetsNotFoundLocally) as info:
        await compat.ensure_assets()
    assert isinstance(info.value, FileNotFoundError)


async def test_an_unknown_arch_is_a_not_found_error_as_in_0_22_0(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """0.22.0 raised AssetNotFoundError for `arm64` (no such file); was: a plain AssetError
    that `except AssetNotFoundError` missed. Still a usage error (exit 2 on the CLI)."""
    monkeypatch.setenv("EXEC_SANDBOX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("EXEC_SANDBOX_OFFLINE", "1")
    for call in (compat.fetch_kernel, compat.fetch_initramfs):
        with pytest.raises(AssetNotFoundError, match="unknown arch 'arm64'") as info:
            await call(arch="arm64")
        assert isinstance(info.value, ConfigError)
    with pytest.raises(AssetNotFoundError, match="unknown arch 'arm64'"):
        await compat.fetch_base_image("python", arch="arm64")


async def test_app_version_picks_the_release_and_explicit_settings_win(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = types.ModuleType("exec_sandbox")
    app.__version__ = "0.22.0"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "exec_sandbox", app)
    assert compat._get_asset_version() == ("0.22.0", "v0.22.0")
    app.__version__ = "0.23.0.dev4"  # type: ignore[attr-defined]
    assert compat._get_asset_version() == ("latest", "latest")
    monkeypatch.setenv("EXEC_SANDBOX_ASSET_VERSION", "v0.21.0")
    assert compat._get_asset_version() == ("0.21.0", "v0.21.0")


async def test_environment_is_read_on_each_call(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert compat.is_offline_mode() is False
    monkeypatch.setenv("EXEC_SANDBOX_OFFLINE", "1")
    assert compat.is_offline_mode() is True
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / VMLINUZ).write_bytes(b"k")
    monkeypatch.setenv("EXEC_SANDBOX_IMAGES_DIR", str(tmp_path / "imgs"))
    assert await compat.fetch_kernel() == tmp_path / "imgs" / VMLINUZ


async def test_app_tree_dev_builds_are_found(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """0.22.0 looked in its repository's images/dist/ and gvproxy-wrapper/bin/."""
    root = tmp_path / "app"
    (root / "images" / "dist").mkdir(parents=True)
    (root / "gvproxy-wrapper" / "bin").mkdir(parents=True)
    (root / "images" / "dist" / VMLINUZ).write_bytes(b"k")
    (root / "gvproxy-wrapper" / "bin" / GVPROXY).write_bytes(b"g")
    monkeypatch.setenv("EXEC_SANDBOX_CACHE_DIR", str(tmp_path / "cache"))
    assert await compat.ensure_assets(download=False) == root / "images" / "dist"
    assert await compat.get_gvproxy_path() == root / "gvproxy-wrapper" / "bin" / GVPROXY


async def test_explicit_images_dir_lacking_files_falls_back_when_downloads_are_allowed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    empty = tmp_path / "configured"
    empty.mkdir()
    env_dir = tmp_path / "env"
    env_dir.mkdir()
    for name in (VMLINUZ, INITRAMFS, GVPROXY):
        (env_dir / name).write_bytes(b"x")
    monkeypatch.setenv("EXEC_SANDBOX_IMAGES_DIR", str(env_dir))
    monkeypatch.setenv("EXEC_SANDBOX_CACHE_DIR", str(tmp_path / "cache"))
    assert await compat.ensure_assets(override=empty) == env_dir
    with pytest.raises(FileNotFoundError, match="auto_download_assets=False"):
        await compat.ensure_assets(override=empty, download=False)


async def test_gvproxy_is_not_needed_to_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Only networked VMs need gvproxy; ensure_assets returns the images dir without it."""
    images = tmp_path / "images"
    images.mkdir()
    (images / VMLINUZ).write_bytes(b"k")
    (images / INITRAMFS).write_bytes(b"i")
    monkeypatch.setenv("EXEC_SANDBOX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("EXEC_SANDBOX_OFFLINE", "1")
    assert await compat.ensure_assets(override=images) == images


async def test_signed_release_pvh_kernel_and_per_file_prefetch_errors(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    release: SampleRelease,
    registry: RegistryServer,
    repo_name: str,
) -> None:
    use(monkeypatch, registry.ref(repo_name), release, EXEC_SANDBOX_CACHE_DIR=str(tmp_path / "c"))
    kernel = await compat.fetch_kernel(arch="x86_64")
    assert kernel.name == "vmlinux-x86_64"  # PVH direct boot, as 0.22.0 preferred
    assert kernel.read_bytes() == release.expected("vmlinux-x86_64")
    assert (await compat.fetch_kernel(arch="aarch64")).name == "vmlinuz-aarch64"

    # Two files break, differently: each entry says what happened to its own file.
    compat._assets_singleton = None
    monkeypatch.setenv("EXEC_SANDBOX_CACHE_DIR", str(tmp_path / "c2"))
    layout = tmp_path / "partial"
    partial = publish_sample_release(f"oci:{layout}", VERSION, tmp_path / "work", key=release.key)
    for name in (INITRAMFS, f"raw-base-{ARCH}.qcow2"):
        digest = partial.layer(name).digest.partition(":")[2]
        (layout / "blobs" / "sha256" / digest).write_bytes(b"damaged " + name.encode())
    monkeypatch.setenv("EXEC_SANDBOX_REGISTRY_MIRRORS", f"oci:{layout}")
    monkeypatch.setenv("EXEC_SANDBOX_REGISTRY", f"oci:{layout}")
    result = await compat.prefetch_all_assets()
    assert not result.success
    assert [name for name, _ in result.errors] == ["initramfs", "raw base"]
    (_, first), (_, second) = result.errors
    assert INITRAMFS in first and f"raw-base-{ARCH}" not in first
    assert f"raw-base-{ARCH}" in second and INITRAMFS not in second


# --------------------------------------------------------------------------- legacy releases


def serve_legacy_release(
    static: StaticServer, release: SampleRelease, digests: bool = True
) -> None:
    """A GitHub API answer and download folder like those of exec-sandbox <= 0.22.0."""
    folder = static.root / "download" / f"v{VERSION}"
    folder.mkdir(parents=True)
    assets = []
    for name, blob in release.blobs.items():
        shutil.copyfile(blob.path, folder / name)
        entry = {
            "name": name,
            "size": blob.size,
            "browser_download_url": static.url_for(f"download/v{VERSION}/{name}"),
        }
        if digests:
            entry["digest"] = blob.digest
        assets.append(entry)
    api = static.root / "repos" / "dualeai" / "exec-sandbox" / "releases" / "tags"
    api.mkdir(parents=True)
    (api / f"v{VERSION}").write_text(json.dumps({"tag_name": f"v{VERSION}", "assets": assets}))


@pytest.fixture
def legacy_env(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    registry: RegistryServer,
    static_server: StaticServer,
    release: SampleRelease,
) -> SampleRelease:
    """No signed release where the client looks; the legacy one on a GitHub look-alike."""
    use(monkeypatch, registry.ref("nothing/here"), release)
    monkeypatch.setenv("EXEC_SANDBOX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("EXEC_SANDBOX_GITHUB_API_URL", static_server.url)
    return release


async def test_legacy_release_is_refused_by_default_naming_the_opt_in(
    legacy_env: SampleRelease, static_server: StaticServer
) -> None:
    serve_legacy_release(static_server, legacy_env)
    with pytest.raises(ReleaseNotFoundError, match="EXEC_SANDBOX_ALLOW_LEGACY_RELEASES=1"):
        await compat.fetch_initramfs()
    assert not [r for r in static_server.requests if "/repos/" in r.path]


async def test_legacy_release_with_opt_in_is_checked_against_the_api_digest(
    monkeypatch: pytest.MonkeyPatch, legacy_env: SampleRelease, static_server: StaticServer
) -> None:
    serve_legacy_release(static_server, legacy_env)
    monkeypatch.setenv("EXEC_SANDBOX_ALLOW_LEGACY_RELEASES", "1")
    path = await compat.fetch_initramfs()
    assert path.read_bytes() == legacy_env.expected(INITRAMFS)
    assert AssetClient(load_settings()).store.lookup(VERSION, INITRAMFS) == path

    # A file that does not match its API digest is refused.
    compat._assets_singleton = None
    name = f"python-3.14-base-{ARCH}.qcow2.zst"
    served = static_server.root / "download" / f"v{VERSION}" / name
    data = bytearray(served.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    served.write_bytes(bytes(data))
    with pytest.raises(AssetChecksumError):
        await compat.fetch_base_image("python")


async def test_legacy_release_files_without_digest_are_refused(
    monkeypatch: pytest.MonkeyPatch, legacy_env: SampleRelease, static_server: StaticServer
) -> None:
    """0.22.0 accepted a file the API gave no digest for, unchecked; we do not."""
    serve_legacy_release(static_server, legacy_env, digests=False)
    monkeypatch.setenv("EXEC_SANDBOX_ALLOW_LEGACY_RELEASES", "1")
    with pytest.raises(Exception, match=r"no initramfs-.* with a digest"):
        await compat.fetch_initramfs()
    assert not [r for r in static_server.requests if "/download/" in r.path]
