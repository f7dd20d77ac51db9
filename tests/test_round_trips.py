"""Round trips before the first blob byte, counted against a real registry (issue 18).

A FaultProxy in front of docker-registry holds every answer back `DELAY` seconds, as a
link with that round trip would: requests sent together arrive together, and a request
sent because of an answer arrives after it. The round a request belongs to is then
1 + the round of the latest request answered before it arrived; what is asserted is
that count, never a time. The delay only has to exceed the client's own gaps between
requests it sends together (milliseconds), so the count does not depend on load.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

import exec_sandbox_assets as esa
from conftest import FaultProxyFactory
from exec_sandbox_assets.oci.model import MEDIA_TYPE_MANIFEST
from exec_sandbox_assets.oci.referrers import fallback_tag
from exec_sandbox_assets.release import catalog, keyless
from releases import SampleRelease, publish_sample_release
from servers import FaultProxy, RegistryServer, RequestRecord, request_rounds
from sigstore_instance import SigstoreInstance
from test_keyless_cli import store_only_bundle

VERSION = "1.0.0"
KERNEL = f"vmlinuz-{catalog.host_arch()}"
DELAY = 0.4  # seconds each answer is held back: one round trip of the simulated link


@pytest.fixture(autouse=True)
def fresh_singleton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(esa, "_assets_singleton", None)


@pytest.fixture
def release(registry: RegistryServer, repo_name: str, tmp_path: Path) -> SampleRelease:
    return publish_sample_release(registry.ref(repo_name), VERSION, tmp_path / "work")


def configure(proxy: FaultProxy, repo: str, release: SampleRelease, tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    esa.configure(
        version=VERSION,
        registry=proxy.ref(repo),
        trusted_keys=(str(release.key.public),),
        airgap=True,
        cache_dir=str(cache),
        local_build_dir=tmp_path / "no-local-build",
    )
    return cache


def what(record: RequestRecord, release: SampleRelease) -> str:
    """A request's role in the pull, from its path."""
    layers = {blob.digest for blob in release.blobs.values()}
    tail = record.path.rsplit("/", 2)
    if tail[-2] == "manifests":
        ref = tail[-1]
        if ref == f"v{VERSION}":
            return "index"
        return "signature" if ref.endswith(".sig") else "manifest"
    if tail[-2] == "blobs":
        return "layer" if tail[-1] in layers else "payload"
    return record.path


async def test_the_first_blob_byte_comes_after_two_round_trips(
    registry: RegistryServer,
    release: SampleRelease,
    fault_proxy: FaultProxyFactory,
    repo_name: str,
    tmp_path: Path,
) -> None:
    """Index, then the signature manifest and the platform manifest together, then the
    blobs, with the signature's payload alongside them: 2 round trips before the first
    blob is asked for (3 with a token), where reading in series took 4."""
    proxy = fault_proxy(registry)
    proxy.stall_seconds = DELAY
    configure(proxy, repo_name, release, tmp_path)

    path = await esa.fetch_kernel()

    assert path.read_bytes() == release.expected(KERNEL)
    seen = [(n, what(r, release)) for n, r in request_rounds(proxy.requests)]
    assert seen[:3] == [(1, "index"), (2, "signature"), (2, "manifest")] or seen[:3] == [
        (1, "index"),
        (2, "manifest"),
        (2, "signature"),
    ], seen
    first_layer = min(n for n, role in seen if role == "layer")
    assert first_layer == 3, seen
    assert [n for n, role in seen if role == "payload"] == [3], seen


async def test_blobs_download_while_the_signature_is_checked_but_nothing_installs(
    registry: RegistryServer,
    release: SampleRelease,
    fault_proxy: FaultProxyFactory,
    repo_name: str,
    tmp_path: Path,
) -> None:
    """The signature's payload is held back: meanwhile the kernel's blob lands in its
    partial, and nothing appears under the release's directory until it verified."""
    proxy = fault_proxy(registry)
    cache = configure(proxy, repo_name, release, tmp_path)
    payload = _payload_digest(registry, repo_name, release)
    assert payload not in {blob.digest for blob in release.blobs.values()}
    proxy.match_path = payload
    proxy.stall_seconds = 3.0

    task = asyncio.create_task(esa.fetch_kernel())
    blob = release.layer(KERNEL)
    partial = cache / "blobs" / "sha256" / f"{blob.digest.removeprefix('sha256:')}.partial"
    for _ in range(250):
        if partial.exists() and partial.stat().st_size == blob.size:
            break
        await asyncio.sleep(0.01)
    assert partial.exists() and partial.stat().st_size == blob.size, "no download meanwhile"
    assert not task.done()
    assert not (cache / f"v{VERSION}").exists(), "installed before the signature verified"

    path = await task
    assert path.read_bytes() == release.expected(KERNEL)


def _payload_digest(registry: RegistryServer, repo: str, release: SampleRelease) -> str:
    """The digest of the signature's payload (the one layer of the signature manifest)."""
    url = f"{registry.url}/v2/{repo}/manifests/{release.signature_tag}"
    answer = httpx.get(url, headers={"Accept": MEDIA_TYPE_MANIFEST})
    digest: str = answer.raise_for_status().json()["layers"][0]["digest"]
    return digest


async def test_keyless_bundles_are_asked_for_beside_the_manifest(
    registry: RegistryServer,
    release: SampleRelease,
    fault_proxy: FaultProxyFactory,
    repo_name: str,
    tmp_path: Path,
    sigstore_test_instance: SigstoreInstance,
    sigstore_root: Path,
) -> None:
    """Keyless trust alone (the default): no key signature is asked for, and the
    referrers lookup starts in round 2, beside the platform manifest, not after it."""
    workflow = "https://github.com/acme/assets/.github/workflows/release.yml"
    statement = keyless.statement(release.index_digest, VERSION, release.created)
    bundle = sigstore_test_instance.bundle(
        statement, workflow_ref=f"{workflow}@refs/tags/v{VERSION}"
    )
    store_only_bundle(release, tmp_path / "writer", bundle)
    proxy = fault_proxy(registry)
    proxy.stall_seconds = DELAY
    esa.configure(
        version=VERSION,
        registry=proxy.ref(repo_name),
        trusted_keys=(),
        trusted_workflows=(workflow,),
        sigstore_root=sigstore_root,
        airgap=True,
        cache_dir=str(tmp_path / "cache"),
        local_build_dir=tmp_path / "no-local-build",
    )

    path = await esa.fetch_kernel()

    assert path.read_bytes() == release.expected(KERNEL)
    seen = [(n, r.path) for n, r in request_rounds(proxy.requests)]
    assert not [p for _, p in seen if p.endswith(".sig")], seen
    second = [p for n, p in seen if n == 2]
    assert any(
        "/referrers/" in p or p.endswith(fallback_tag(release.index_digest)) for p in second
    ), seen
    assert any("/manifests/sha256:" in p for p in second), seen
