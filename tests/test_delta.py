"""Delta upgrades (docs/format.md §8) end to end: `publish` makes patches from earlier
releases on a real registry, an OCI layout or a release folder; a client holding
release N (or N-2, or 0.22.0's files) gets N+1 by patch or by reuse, verified, and falls
back to the full download on every failure: a tampered patch, a source without it, a
disk that fills, a SIGKILL mid-reconstruction followed by a resumed pull.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from exec_sandbox_assets.client import AssetClient
from exec_sandbox_assets.config import Settings, load_settings
from exec_sandbox_assets.publish import PublishRequest, publish
from exec_sandbox_assets.publish.sample import make_sample_inputs, sample_bytes
from exec_sandbox_assets.release import catalog
from releases import KeyPair, make_key_pair
from servers import RegistryServer

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


def settings_for(source: str, cache: Path, key: KeyPair, version: int) -> Settings:
    return load_settings(
        env={
            "EXEC_SANDBOX_AIRGAP": "1",
            "EXEC_SANDBOX_REGISTRY_MIRRORS": source,
            "EXEC_SANDBOX_ASSET_VERSION": f"1.{version}.0",
            "EXEC_SANDBOX_CACHE_DIR": str(cache),
            "EXEC_SANDBOX_TRUSTED_KEYS": str(key.public),
        }
    ).with_(local_build_dir=None, host_os="linux", host_goarch="amd64")


def pull(source: str, cache: Path, key: KeyPair, version: int, work: Path) -> AssetClient:
    """Pull every linux/amd64 file of `version` and compare it with its build output."""
    client = AssetClient(settings_for(source, cache, key, version))
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
