"""Delta upgrades (docs/format.md §8) end to end: `publish` makes patches from earlier
releases on a real registry, an OCI layout or a release folder; a client holding
release N (or N-2, or 0.22.0's files) gets N+1 by patch or by reuse, verified, and falls
back to the full download on every failure: a tampered patch, a source without it, a
disk that fills, a SIGKILL mid-reconstruction followed by a resumed pull.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import FaultProxyFactory
from exec_sandbox_assets.base.errors import OutOfSpaceError
from exec_sandbox_assets.cache import space
from exec_sandbox_assets.client import AssetClient
from exec_sandbox_assets.config import Settings, load_settings
from exec_sandbox_assets.mirror import mirror
from exec_sandbox_assets.oci.layout import LayoutReader
from exec_sandbox_assets.oci.model import ACCEPT_MANIFESTS, Index, Manifest
from exec_sandbox_assets.oci.referrers import fallback_tag
from exec_sandbox_assets.publish import PublishRequest, publish
from exec_sandbox_assets.publish.sample import make_sample_inputs, sample_bytes
from exec_sandbox_assets.release import catalog
from exec_sandbox_assets.release.delta import (
    ANN_PATCHES,
    KEEPALIVE_ARTIFACT_TYPE,
    Patch,
    read_patches,
)
from releases import KeyPair, flip_stored_blob, make_key_pair
from servers import RegistryServer, StaticServer, free_port

SMALL = 48 * 1024
IMAGE = 2 << 20  # above publish.delta.MIN_DELTA_SIZE
IMAGE_NAME = "python-3.14-base-x86_64.qcow2"
KERNEL = "vmlinuz-x86_64"
GVPROXY = "gvproxy-wrapper-linux-amd64"
PLATFORMS = (("linux", "amd64"),)
SPECS = catalog.platform_assets("linux", "amd64")


def image(version: int) -> bytes:
    """The base image of release `version`: each release rewrites a region, inserts a
    little part-way (shifting what follows) and appends (the issue's scenario, small)."""
    spec = catalog.spec_for_name(IMAGE_NAME)
    assert spec is not None
    data = bytearray(sample_bytes(spec, IMAGE))
    for v in range(1, version + 1):
        rng = random.Random(v)
        at = rng.randrange(0, len(data) - 8192)
        data[at : at + 8192] = rng.randbytes(8192)
        mid = len(data) // 2 + v * 1000
        data[mid:mid] = rng.randbytes(4096)
        data += rng.randbytes(16384)
    return bytes(data)


def dist_for(work: Path, version: int) -> Path:
    """Build output of release `version`: a new image and kernel, the same gvproxy."""
    dist = make_sample_inputs(work / f"dist-{version}", arches=("x86_64",), size=SMALL)
    (dist / IMAGE_NAME).write_bytes(image(version))
    kernel = dist / KERNEL
    kernel.write_bytes(kernel.read_bytes() + f"kernel {version}".encode())
    return dist


def publish_version(target: str, version: int, work: Path, key: KeyPair, **kw: object) -> str:
    result = publish(
        PublishRequest(
            inputs=(dist_for(work, version),),
            version=f"1.{version}.0",
            targets=(target,),
            keys=(key.private,),
            work_dir=work / f"compressed-{version}",
            platforms=PLATFORMS,
            created=f"2026-01-0{version + 1}T00:00:00Z",
            level=3,
            **kw,  # type: ignore[arg-type]
        )
    )
    return result.index_digest


def settings_for(
    source: str, cache: Path, key: KeyPair, version: int, legacy: tuple[Path, ...] = ()
) -> Settings:
    return load_settings(
        env={
            "EXEC_SANDBOX_AIRGAP": "1",
            "EXEC_SANDBOX_REGISTRY_MIRRORS": source,
            "EXEC_SANDBOX_ASSET_VERSION": f"1.{version}.0",
            "EXEC_SANDBOX_CACHE_DIR": str(cache),
            "EXEC_SANDBOX_TRUSTED_KEYS": str(key.public),
            "EXEC_SANDBOX_MIN_FREE": "0",  # small tmpfs caches: no margin
        }
    ).with_(local_build_dir=None, host_os="linux", host_goarch="amd64", legacy_dirs=legacy)


def pull(
    source: str, cache: Path, key: KeyPair, version: int, work: Path, legacy: tuple[Path, ...] = ()
) -> AssetClient:
    """Pull every linux/amd64 file of `version` and compare it with its build output."""
    client = AssetClient(settings_for(source, cache, key, version, legacy))
    paths = asyncio.run(client.fetch(SPECS))
    dist = work / f"dist-{version}"
    for spec in SPECS:
        assert paths[spec.output_name].read_bytes() == (dist / spec.output_name).read_bytes()
    return client


def how(client: AssetClient) -> dict[str, str]:
    return {name: o.how for name, o in client.obtained.items()}


@pytest.fixture
def key(tmp_path: Path) -> KeyPair:
    return make_key_pair(tmp_path / "keys")


def test_upgrade_by_patch_from_n_minus_1_on_a_registry(
    registry: RegistryServer, repo_name: str, tmp_path: Path, key: KeyPair
) -> None:
    ref = registry.ref(repo_name)
    work = tmp_path / "work"
    publish_version(ref, 1, work, key)
    publish_version(ref, 2, work, key)
    cache = tmp_path / "cache"
    first = pull(ref, cache, key, 1, work)
    assert set(how(first).values()) == {"download"}

    upgrade = pull(ref, cache, key, 2, work)
    got = how(upgrade)
    assert got[IMAGE_NAME] == "patch"
    assert got[GVPROXY] == "reuse"  # unchanged: never downloaded again
    assert got[KERNEL] == "download"  # below the delta size: a full (small) download
    image_cost = upgrade.obtained[IMAGE_NAME]
    assert image_cost.downloaded < image_cost.full / 4
    # The patch is kept alive on the registry: a referrer of the platform manifest,
    # listed under its sha256-<hex> tag (distribution 2.8 has no referrers API).
    accept = {"Accept": ", ".join(ACCEPT_MANIFESTS)}
    index = Index.from_bytes(
        httpx.get(f"{registry.url}/v2/{repo_name}/manifests/v1.2.0", headers=accept).content, "t"
    )
    platform = index.manifests[0].digest
    listed = httpx.get(
        f"{registry.url}/v2/{repo_name}/manifests/{fallback_tag(platform)}", headers=accept
    )
    assert listed.status_code == 200
    (entry,) = Index.from_bytes(listed.content, "t").manifests
    assert entry.artifact_type == KEEPALIVE_ARTIFACT_TYPE
    keepalive = Manifest.from_bytes(
        httpx.get(
            f"{registry.url}/v2/{repo_name}/manifests/{entry.digest}", headers=accept
        ).content,
        "t",
    )
    assert keepalive.subject is not None and keepalive.subject.digest == platform
    assert len(keepalive.layers) == 1


def test_old_clients_see_the_same_layers_with_or_without_patches(
    tmp_path: Path, key: KeyPair
) -> None:
    """Patches add one annotation to a layer: blobs, digests, sizes and media types stay
    what an earlier client, skopeo or oras reads."""
    work = tmp_path / "work"
    with_ = tmp_path / "with"
    publish_version(f"oci:{with_}", 1, work, key)
    publish_version(f"oci:{with_}", 2, work, key)
    without = tmp_path / "without"
    publish_version(f"oci:{without}", 2, work, key, deltas=False)

    def layers(layout: Path) -> list[tuple[str, str, int, dict[str, str]]]:
        with LayoutReader.open(layout) as reader:
            index = Index.from_bytes(
                reader.read_blob(reader.resolve("v1.2.0").digest, 1 << 22), "t"
            )
            manifest = Manifest.from_bytes(
                reader.read_blob(index.manifests[0].digest, 1 << 22), "t"
            )
        return [
            (
                x.media_type,
                x.digest,
                x.size,
                {k: v for k, v in x.annotations.items() if k != ANN_PATCHES},
            )
            for x in manifest.layers
        ]

    assert layers(with_) == layers(without)
    assert layer_patches(with_, 2) and not layer_patches(without, 2)


def layer_patches(layout: Path, version: int) -> tuple[Patch, ...]:
    """The patches the image layer of `version` names in a layout."""
    with LayoutReader.open(layout) as reader:
        index = reader.resolve(f"v1.{version}.0")
        entries = Index.from_bytes(reader.read_blob(index.digest, 1 << 22), "t").manifests
        manifest = Manifest.from_bytes(reader.read_blob(entries[0].digest, 1 << 22), "t")
    (layer,) = [x for x in manifest.layers if x.title == IMAGE_NAME + ".zst"]
    return read_patches(layer.annotations, "t")


def test_n_minus_2_upgrades_by_patch_and_the_keepalive_names_every_patch(
    tmp_path: Path, key: KeyPair
) -> None:
    layout = tmp_path / "layout"
    work = tmp_path / "work"
    for version in (1, 2, 3):
        publish_version(f"oci:{layout}", version, work, key)
    patches = layer_patches(layout, 3)
    assert len(patches) == 2  # the last two releases by tag, newest first
    cache = tmp_path / "cache"
    pull(f"oci:{layout}", cache, key, 1, work)
    upgrade = pull(f"oci:{layout}", cache, key, 3, work)
    assert how(upgrade)[IMAGE_NAME] == "patch"
    assert upgrade.obtained[IMAGE_NAME].downloaded in {p.size for p in patches}
    # The patch blobs stay referenced: a manifest whose subject is the platform manifest.
    blobs = {p.name for p in (layout / "blobs" / "sha256").iterdir()}
    assert {p.digest.partition(":")[2] for p in patches} <= blobs
    keepalives = []
    for name in blobs:
        data = (layout / "blobs" / "sha256" / name).read_bytes()
        if KEEPALIVE_ARTIFACT_TYPE.encode() in data and b'"subject"' in data:
            keepalives.append(Manifest.from_bytes(data, name))
    named = {d.digest for m in keepalives for d in m.layers}
    assert {p.digest for p in patches} <= named


def test_a_first_install_is_a_plain_full_pull(tmp_path: Path, key: KeyPair) -> None:
    layout = tmp_path / "layout"
    work = tmp_path / "work"
    publish_version(f"oci:{layout}", 1, work, key)
    publish_version(f"oci:{layout}", 2, work, key)
    client = pull(f"oci:{layout}", tmp_path / "cache", key, 2, work)
    assert set(how(client).values()) == {"download"}


def test_upgrade_from_files_0_22_0_left_behind(tmp_path: Path, key: KeyPair) -> None:
    """0.22.0's files of release N are adopted by hash, then serve as patch bases."""
    layout = tmp_path / "layout"
    work = tmp_path / "work"
    publish_version(f"oci:{layout}", 1, work, key)
    publish_version(f"oci:{layout}", 2, work, key)
    legacy = tmp_path / "legacy" / "v1.1.0"
    legacy.mkdir(parents=True)
    for spec in SPECS:
        (legacy / spec.output_name).write_bytes((work / "dist-1" / spec.output_name).read_bytes())
    cache = tmp_path / "cache"
    adopted = pull(f"oci:{layout}", cache, key, 1, work, legacy=(legacy,))
    assert set(how(adopted).values()) == {"reuse"}  # nothing downloaded
    upgrade = pull(f"oci:{layout}", cache, key, 2, work)
    assert how(upgrade)[IMAGE_NAME] == "patch"


@pytest.mark.parametrize("kind", ["oci", "oci-archive"])
def test_a_mirror_copies_the_patches_and_air_gapped_hosts_upgrade_by_delta(
    registry: RegistryServer, repo_name: str, tmp_path: Path, key: KeyPair, kind: str
) -> None:
    ref = registry.ref(repo_name)
    work = tmp_path / "work"
    publish_version(ref, 1, work, key)
    publish_version(ref, 2, work, key)
    dest = f"{kind}:{tmp_path / ('copy.tar' if kind == 'oci-archive' else 'copy')}"
    mirror(
        ref,
        dest,
        versions=["1.1.0", "1.2.0"],
        trusted_keys=[key.public],
        work_dir=tmp_path / "mirror-work",
    )
    cache = tmp_path / "cache"
    pull(dest, cache, key, 1, work)
    upgrade = pull(dest, cache, key, 2, work)
    assert how(upgrade)[IMAGE_NAME] == "patch"


def test_patches_from_a_release_folder(tmp_path: Path, key: KeyPair) -> None:
    """An earlier release known only as a GitHub Release folder is a patch base."""
    work = tmp_path / "work"
    folder = tmp_path / "release-1"
    publish_version(f"oci:{tmp_path / 'first'}", 1, work, key, release_dir=folder)
    layout = tmp_path / "second"
    publish_version(f"oci:{layout}", 2, work, key, delta_sources=(str(folder),))
    patches = layer_patches(layout, 2)
    assert len(patches) == 1
    assert patches[0].size < IMAGE // 8


def test_a_tampered_patch_is_refused_before_decoding_and_the_layer_downloaded(
    registry: RegistryServer,
    repo_name: str,
    tmp_path: Path,
    key: KeyPair,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ref = registry.ref(repo_name)
    work = tmp_path / "work"
    publish_version(ref, 1, work, key)
    publish_version(ref, 2, work, key)
    cache = tmp_path / "cache"
    pull(ref, cache, key, 1, work)
    layout = tmp_path / "peek"
    mirror(
        ref,
        f"oci:{layout}",
        versions=["1.2.0"],
        trusted_keys=[key.public],
        work_dir=tmp_path / "mw",
    )
    (patch,) = layer_patches(layout, 2)
    flip_stored_blob(registry.data_dir, patch.digest)
    from exec_sandbox_assets.release import patchcodec

    decoded: list[int] = []
    real = patchcodec.apply_patch

    def spy(*args: Any, **kw: Any) -> int:
        decoded.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(patchcodec, "apply_patch", spy)
    with caplog.at_level(logging.WARNING):
        upgrade = pull(ref, cache, key, 2, work)
    assert decoded == []  # refused on its digest: the decoder never saw it
    assert how(upgrade)[IMAGE_NAME] == "download"
    lines = [r for r in caplog.records if "no delta" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    assert patch.digest in lines[0].getMessage()


def test_a_proxy_that_drops_range_still_ends_in_a_verified_patch(
    registry: RegistryServer,
    repo_name: str,
    tmp_path: Path,
    key: KeyPair,
    fault_proxy: FaultProxyFactory,
) -> None:
    """The patch download breaks off; its resume asks for a range, the proxy drops the
    header, the registry answers 200 with the whole blob: taken as a full download."""
    ref = registry.ref(repo_name)
    work = tmp_path / "work"
    publish_version(ref, 1, work, key)
    publish_version(ref, 2, work, key)
    proxy = fault_proxy(registry)
    via = proxy.ref(repo_name)
    cache = tmp_path / "cache"
    pull(via, cache, key, 1, work)
    layout = tmp_path / "peek"
    mirror(
        ref,
        f"oci:{layout}",
        versions=["1.2.0"],
        trusted_keys=[key.public],
        work_dir=tmp_path / "mw",
    )
    (patch,) = layer_patches(layout, 2)
    proxy.reset()
    proxy.match_path = patch.digest
    proxy.cut_after_bytes = patch.size // 2
    proxy.cut_times = 1
    proxy.strip_range = True
    upgrade = pull(via, cache, key, 2, work)
    assert how(upgrade)[IMAGE_NAME] == "patch"
    asked = [r for r in proxy.requests if patch.digest in r.path and r.method == "GET"]
    assert len(asked) >= 2
    assert any("range" in r.headers for r in asked[1:])  # a resume was asked for


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")


def test_a_disk_that_fills_during_reconstruction_loses_nothing(
    tmp_path: Path, key: KeyPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = tmp_path / "layout"
    work = tmp_path / "work"
    publish_version(f"oci:{layout}", 1, work, key)
    publish_version(f"oci:{layout}", 2, work, key)
    cache = tmp_path / "cache"
    _mount_tmpfs(cache, "16m")
    try:
        pull(f"oci:{layout}", cache, key, 1, work)
        st = os.statvfs(cache)
        free = st.f_bavail * st.f_frsize
        filler = cache / "filler"
        filler.write_bytes(b"\1" * (free - (256 << 10)))  # leave 256 KiB: the patch fits
        # Another process fills the disk after the client's free-space check (which would
        # otherwise refuse the upgrade before its first byte): the check sees room.
        monkeypatch.setattr(space, "free_bytes", lambda path: (Path(path), 1 << 40))
        client = AssetClient(settings_for(f"oci:{layout}", cache, key, 2))
        with pytest.raises(OutOfSpaceError):
            asyncio.run(client.fetch(SPECS))
        v2 = cache / "v1.2.0"
        assert not [p for p in v2.iterdir() if ".tmp-" in p.name] if v2.exists() else True
        # Release N is intact, and once there is room the upgrade completes.
        assert AssetClient(settings_for(f"oci:{layout}", cache, key, 1)).find_cached(IMAGE_NAME)
        filler.unlink()
        pull(f"oci:{layout}", cache, key, 2, work)
    finally:
        subprocess.run(["umount", "-l", str(cache)], check=False)


def test_sigkill_during_reconstruction_then_a_resumed_pull_ends_byte_exact(
    tmp_path: Path, key: KeyPair
) -> None:
    layout = tmp_path / "layout"
    work = tmp_path / "work"
    publish_version(f"oci:{layout}", 1, work, key)
    publish_version(f"oci:{layout}", 2, work, key)
    cache = tmp_path / "cache"
    pull(f"oci:{layout}", cache, key, 1, work)
    marker = tmp_path / "decoding"
    script = f"""
import asyncio, sys, time
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).parent)!r})
import exec_sandbox_assets.release.patchcodec as d
real = d.apply_patch
def slow(ref, patch, write, cap):
    def w(data):
        write(data)
        Path({str(marker)!r}).touch()
        time.sleep(120)
    return real(ref, patch, w, cap)
d.apply_patch = slow
from test_delta import SPECS, settings_for
from releases import KeyPair
from exec_sandbox_assets.client import AssetClient
key = KeyPair(Path({str(key.private)!r}), Path({str(key.public)!r}))
s = settings_for({f"oci:{layout}"!r}, Path({str(cache)!r}), key, 2)
asyncio.run(AssetClient(s).fetch(SPECS))
"""
    proc = subprocess.Popen([sys.executable, "-c", script], env=os.environ.copy())
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "the pull ended before reconstructing"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    v2 = cache / "v1.2.0"
    assert [p for p in v2.iterdir() if ".tmp-" in p.name]  # the crash left its temp file
    upgrade = pull(f"oci:{layout}", cache, key, 2, work)
    assert how(upgrade)[IMAGE_NAME] == "patch"
    assert not [p for p in v2.iterdir() if ".tmp-" in p.name]


def test_pull_reports_what_the_upgrade_saved(
    tmp_path: Path, key: KeyPair, capsys: pytest.CaptureFixture[str]
) -> None:
    from exec_sandbox_assets.cli import main

    layout = tmp_path / "layout"
    work = tmp_path / "work"
    publish_version(f"oci:{layout}", 1, work, key)
    publish_version(f"oci:{layout}", 2, work, key)
    common = [
        *("--cache-dir", str(tmp_path / "cache"), "--mirror", f"oci:{layout}", "--airgap"),
        *("--trusted-key", str(key.public)),
    ]
    assert main([*common, "--asset-version", "1.1.0", "pull"]) == 0
    capsys.readouterr()
    assert main([*common, "--asset-version", "1.2.0", "pull", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    by_name = {f["name"]: f for f in doc["files"]}
    assert by_name[IMAGE_NAME]["obtained"] == "patch"
    assert by_name[GVPROXY]["obtained"] == "reuse"
    assert by_name[GVPROXY]["bytes_downloaded"] == 0
    assert 0 < doc["bytes_downloaded"] < doc["bytes_full"] / 2
    # The text summary says it too (a third release, so something is fetched again).
    publish_version(f"oci:{layout}", 3, work, key)
    assert main([*common, "--asset-version", "1.3.0", "pull"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"downloaded \S+ \S+ of \S+ \S+", text), text


def test_publishing_a_release_again_makes_the_same_patches(tmp_path: Path, key: KeyPair) -> None:
    """Patches are deterministic (one thread, a fixed level): a re-run yields the same
    index digest, so the publisher's no-conflict rule still holds."""
    layout = f"oci:{tmp_path / 'layout'}"
    work = tmp_path / "work"
    publish_version(layout, 1, work, key)
    first = publish_version(layout, 2, work, key)
    shutil.rmtree(work / "compressed-2")  # patches made from scratch again
    assert publish_version(layout, 2, work, key) == first


def test_a_mirror_of_a_source_without_its_patches_copies_the_release_whole(
    tmp_path: Path, key: KeyPair, caplog: pytest.LogCaptureFixture
) -> None:
    layout = tmp_path / "layout"
    work = tmp_path / "work"
    publish_version(f"oci:{layout}", 1, work, key)
    publish_version(f"oci:{layout}", 2, work, key)
    (patch,) = layer_patches(layout, 2)
    (layout / "blobs" / "sha256" / patch.digest.partition(":")[2]).unlink()
    dest = f"oci:{tmp_path / 'copy'}"
    with caplog.at_level(logging.WARNING):
        mirror(
            f"oci:{layout}",
            dest,
            versions=["1.1.0", "1.2.0"],
            trusted_keys=[key.public],
            work_dir=tmp_path / "mw",
        )
    assert any("patches not copied" in r.getMessage() for r in caplog.records)
    cache = tmp_path / "cache"
    pull(dest, cache, key, 1, work)
    upgrade = pull(dest, cache, key, 2, work)  # byte-exact: the full layer instead
    assert how(upgrade)[IMAGE_NAME] == "download"


def test_a_github_release_folder_serves_layers_only_and_nothing_is_refetched(
    tmp_path: Path,
    key: KeyPair,
    static_server: StaticServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """0.22.0's channel carries no patch: the client downloads changed layers, without a
    warning, and still takes unchanged files from its cache."""
    layout = tmp_path / "layout"
    work = tmp_path / "work"
    publish_version(f"oci:{layout}", 1, work, key)
    folder = static_server.root / "releases" / "download" / "v1.2.0"
    publish_version(f"oci:{layout}", 2, work, key, release_dir=folder)
    cache = tmp_path / "cache"
    pull(f"oci:{layout}", cache, key, 1, work)
    settings = load_settings(
        env={},
        cache_dir=cache,
        version="1.2.0",
        registry=f"http://127.0.0.1:{free_port()}/test/gone",
        releases_url=f"{static_server.url}/releases/download",
        trusted_keys=(key.public,),
        docker_config=tmp_path / "no-docker-config.json",
    ).with_(local_build_dir=None, host_os="linux", host_goarch="amd64")
    client = AssetClient(settings)
    with caplog.at_level(logging.WARNING, logger="exec_sandbox_assets.cache.delta"):
        paths = asyncio.run(client.fetch(SPECS))
    for spec in SPECS:
        expected = (work / "dist-2" / spec.output_name).read_bytes()
        assert paths[spec.output_name].read_bytes() == expected
    assert how(client)[IMAGE_NAME] == "download"
    assert how(client)[GVPROXY] == "reuse"
    assert not [r for r in caplog.records if "no delta" in r.getMessage()]
