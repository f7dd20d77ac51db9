"""The GitHub Releases fallback (SPEC.md section 6) and the no-internet switch.

A threaded static server plays GitHub: the publisher's release folder is served under
`dualeai/exec-sandbox/releases/download/vV/NAME`, behind a 302 redirector (GitHub's
CDN hop) or a fault proxy (a cut body). The registry the client is configured with is
stopped, so every byte comes from the fallback, and every byte is verified as it would
be from a registry. Only 127.0.0.1 is contacted: an audit hook records every name
lookup and connect to prove it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import FaultProxyFactory
from exec_sandbox_assets.base.errors import (
    AllSourcesFailedError,
    AssetChecksumError,
    AssetNotFoundError,
    SignatureError,
    TrustError,
)
from exec_sandbox_assets.client import AssetClient
from exec_sandbox_assets.config import DEFAULT_RELEASES_DOWNLOAD, Settings, load_settings
from exec_sandbox_assets.oci.http import HttpCore
from exec_sandbox_assets.oci.model import Index, Manifest
from exec_sandbox_assets.oci.retry import RetryPolicy
from exec_sandbox_assets.publish import PublishRequest, make_sample_inputs, publish
from exec_sandbox_assets.release import catalog
from exec_sandbox_assets.release.documents import RELEASE_INDEX_FILE, release_manifest_file
from exec_sandbox_assets.sources import (
    LayoutSource,
    RegistrySource,
    ReleasesSource,
    build_sources,
    latest_download_url,
)
from releases import KeyPair, make_key_pair, stored_blob_path
from servers import LOOPBACK, RegistryServer, StaticServer, free_port

VERSION = "0.9.1"
TAG = f"v{VERSION}"
CREATED = "2026-01-02T03:04:05Z"
SIZE = 192 * 1024
PLATFORMS = (("linux", "amd64"), ("linux", "arm64"))
SPECS = catalog.platform_assets("linux", "amd64")
RELEASES_PATH = "dualeai/exec-sandbox/releases"
BIG = catalog.base_image("python", "x86_64")  # the largest sample blob


@dataclass(frozen=True)
class Published:
    key: KeyPair
    dist: Path
    release_dir: Path
    index_digest: str


def _publish(work: Path, targets: tuple[str, ...] = ()) -> Published:
    key = make_key_pair(work / "keys")
    dist = make_sample_inputs(work / "dist", size=SIZE)
    result = publish(
        PublishRequest(
            inputs=(dist,),
            version=VERSION,
            targets=targets,
            keys=(key.private,),
            work_dir=work / "work",
            platforms=PLATFORMS,
            created=CREATED,
            level=3,
            release_dir=work / "release",
        )
    )
    return Published(key, dist, work / "release", result.index_digest)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Published:
    """One signed release folder for the module (read-only: tests copy it)."""
    return _publish(tmp_path_factory.mktemp("published"))


def serve(static: StaticServer, published: Published, folder: str = TAG) -> Path:
    """Copy the release folder to where GitHub would serve it; returns that folder."""
    dest = static.root / RELEASES_PATH / "download" / folder
    shutil.copytree(published.release_dir, dest)
    return dest


def releases_url(server: StaticServer | Any) -> str:
    return f"{server.url}/{RELEASES_PATH}/download"


def dead_registry() -> str:
    """A registry reference nothing listens on (connection refused)."""
    return f"http://{LOOPBACK}:{free_port()}/test/gone"


def settings_for(
    tmp_path: Path,
    published: Published,
    releases: str,
    *,
    registry: str | None = None,
    version: str = VERSION,
    **changes: Any,
) -> Settings:
    settings = load_settings(
        env={},
        cache_dir=tmp_path / "cache",
        version=version,
        registry=registry or dead_registry(),
        releases_url=releases,
        trusted_keys=(published.key.public,),
        docker_config=tmp_path / "no-docker-config.json",
    )
    return settings.with_(local_build_dir=None, host_os="linux", host_goarch="amd64", **changes)


def fetch(settings: Settings) -> dict[str, Path]:
    return asyncio.run(AssetClient(settings).fetch(SPECS))


def assert_complete(paths: dict[str, Path], published: Published) -> None:
    assert sorted(paths) == sorted(s.output_name for s in SPECS)
    for name, path in paths.items():
        assert path.read_bytes() == (published.dist / name).read_bytes(), name


def requested(server: StaticServer) -> list[str]:
    return [r.path.rsplit("/", 1)[-1] for r in server.requests]


# --------------------------------------------------------------------------- fallback


def test_registry_stopped_client_completes_from_github_releases(
    registry: RegistryServer, static_server: StaticServer, tmp_path: Path, repo_name: str
) -> None:
    """Published to the registry AND the release folder; the registry then goes away."""
    pub = _publish(tmp_path / "pub", targets=(registry.ref(repo_name),))
    serve(static_server, pub)
    registry.stop()
    settings = settings_for(
        tmp_path, pub, releases_url(static_server), registry=registry.ref(repo_name)
    )

    assert_complete(fetch(settings), pub)

    names = requested(static_server)
    # The index, then its signature and the platform manifest together (issue 18).
    assert names[0] == RELEASE_INDEX_FILE
    assert set(names[1:3]) == {"oci-signature.json", release_manifest_file("linux", "amd64")}
    assert "oci-signature-payload-0.json" in names
    assert release_manifest_file("linux", "amd64") in names
    assert release_manifest_file("linux", "arm64") not in names  # not needed: not fetched
    assert all(
        r.path.startswith(f"/{RELEASES_PATH}/download/{TAG}/") for r in static_server.requests
    )
    # Warm: a second client finds everything in the cache and asks nobody.
    static_server.requests.clear()
    assert_complete(fetch(settings), pub)
    assert static_server.requests == []


def test_redirect_to_a_cdn_host_is_followed(
    published: Published,
    static_server: StaticServer,
    static_redirector: StaticServer,
    tmp_path: Path,
) -> None:
    serve(static_server, published)
    assert_complete(
        fetch(settings_for(tmp_path, published, releases_url(static_redirector))), published
    )
    assert static_redirector.requests and all(r.status == 302 for r in static_redirector.requests)
    assert {r.path for r in static_redirector.requests} == {r.path for r in static_server.requests}


def test_latest_reads_the_index_from_latest_download_then_its_version_folder(
    published: Published, static_server: StaticServer, tmp_path: Path
) -> None:
    serve(static_server, published)
    latest = static_server.root / RELEASES_PATH / "latest" / "download"
    latest.mkdir(parents=True)
    shutil.copy(published.release_dir / RELEASE_INDEX_FILE, latest / RELEASE_INDEX_FILE)

    paths = fetch(settings_for(tmp_path, published, releases_url(static_server), version="latest"))

    assert_complete(paths, published)
    first, *rest = static_server.requests
    assert first.path == f"/{RELEASES_PATH}/latest/download/{RELEASE_INDEX_FILE}"
    assert rest and all(r.path.startswith(f"/{RELEASES_PATH}/download/{TAG}/") for r in rest)


def test_cut_download_resumes_with_range(
    published: Published,
    static_server: StaticServer,
    fault_proxy: FaultProxyFactory,
    tmp_path: Path,
) -> None:
    serve(static_server, published)
    size = (published.release_dir / BIG.name).stat().st_size
    proxy = fault_proxy(static_server)
    proxy.match_path = f"/{BIG.name}"
    proxy.cut_after_bytes = size // 3
    proxy.cut_times = 1

    assert_complete(fetch(settings_for(tmp_path, published, releases_url(proxy))), published)

    gets = [r for r in proxy.requests if r.path.endswith(f"/{BIG.name}")]
    assert [r.headers.get("range") for r in gets] == [None, f"bytes={size // 3}-"]
    assert gets[1].status == 206


def test_missing_release_is_not_found_and_every_source_is_named(
    published: Published, static_server: StaticServer, tmp_path: Path
) -> None:
    serve(static_server, published)
    registry = dead_registry()
    settings = settings_for(
        tmp_path, published, releases_url(static_server), registry=registry, version="9.9.9"
    )
    with pytest.raises(AllSourcesFailedError) as info:
        fetch(settings)
    sources = [a.source for a in info.value.attempts]
    assert sources == [f"registry {registry}", f"releases {releases_url(static_server)}"]
    assert "unreachable" in info.value.attempts[0].error
    assert "404" in info.value.attempts[1].error
    assert f"/download/v9.9.9/{RELEASE_INDEX_FILE}" in info.value.attempts[1].error


# --------------------------------------------------------------------------- tampering


def _nothing_installed(settings: Settings, name: str) -> bool:
    version_dir = settings.cache_dir / TAG
    return not (version_dir / name).exists()


def test_changed_file_is_refused_and_never_installed(
    published: Published, static_server: StaticServer, tmp_path: Path
) -> None:
    folder = serve(static_server, published)
    victim = folder / BIG.name
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    settings = settings_for(tmp_path, published, releases_url(static_server))

    digest = "sha256:" + hashlib.sha256((published.release_dir / BIG.name).read_bytes()).hexdigest()
    with pytest.raises(AssetChecksumError, match=f"blob {digest} from releases"):
        fetch(settings)
    assert _nothing_installed(settings, BIG.output_name)
    # The files that were intact are installed: a trust error on one blob is that blob's.
    assert (settings.cache_dir / TAG / catalog.kernel("x86_64").output_name).is_file()


def test_changed_index_is_refused_before_anything_is_installed(
    published: Published, static_server: StaticServer, tmp_path: Path
) -> None:
    """The blobs may start downloading while the signature is checked (issue 18), but
    the refused release installs nothing."""
    folder = serve(static_server, published)
    doc = json.loads((folder / RELEASE_INDEX_FILE).read_bytes())
    doc["annotations"]["org.opencontainers.image.created"] = "2030-01-01T00:00:00Z"
    (folder / RELEASE_INDEX_FILE).write_bytes(json.dumps(doc).encode())
    settings = settings_for(tmp_path, published, releases_url(static_server))

    with pytest.raises(SignatureError, match="valid signatures from 0 trusted key"):
        fetch(settings)
    assert not (settings.cache_dir / TAG).exists()
    names = requested(static_server)
    assert names[0] == RELEASE_INDEX_FILE
    assert set(names[1:3]) == {"oci-signature.json", release_manifest_file("linux", "amd64")}
    assert "oci-signature-payload-0.json" in names
    assert "oci-index.sigstore.json" in names  # the default trusted workflow's keyless signature
    meta = [n for n in names[3:] if n.endswith(".json")]
    assert set(meta) <= {"oci-signature-payload-0.json", "oci-index.sigstore.json"}


def test_changed_manifest_is_refused(
    published: Published, static_server: StaticServer, tmp_path: Path
) -> None:
    folder = serve(static_server, published)
    path = folder / release_manifest_file("linux", "amd64")
    path.write_bytes(path.read_bytes().replace(b'"size"', b'"size" ', 1))
    settings = settings_for(tmp_path, published, releases_url(static_server))

    with pytest.raises(TrustError, match="manifest"):
        fetch(settings)
    assert not (settings.cache_dir / TAG).exists()


# --------------------------------------------------------------------------- sources


def test_latest_url_is_derived_from_the_base() -> None:
    assert latest_download_url(DEFAULT_RELEASES_DOWNLOAD) == (
        "https://github.com/dualeai/exec-sandbox/releases/latest/download"
    )
    assert latest_download_url("http://mirror:8080/assets/") == "http://mirror:8080/assets/latest"
    source = ReleasesSource(HttpCore(peer="release server"), "http://h/x/releases/download/")
    assert source.folder("v1.2.3") == "http://h/x/releases/download/v1.2.3"
    assert source.folder("latest") == "http://h/x/releases/latest/download"
    with pytest.raises(AssetNotFoundError):
        source.folder("../v1")


async def test_releases_source_serves_verified_documents(
    published: Published, static_server: StaticServer
) -> None:
    serve(static_server, published)
    http = HttpCore(peer="release server", retry=RetryPolicy(attempts=2, base_delay=0.01))
    source = ReleasesSource(http, releases_url(static_server), TAG)
    try:
        data = await source.index(TAG)
        index = Index.from_bytes(data, "test")
        for desc in index.manifests:
            assert desc.platform is not None
            manifest = await source.manifest(desc)
            assert (
                manifest
                == (
                    published.release_dir
                    / release_manifest_file(desc.platform.os, desc.platform.architecture)
                ).read_bytes()
            )
        assert await source.signature(published.index_digest)
    finally:
        await source.aclose()


# --------------------------------------------------------------------------- airgap

_NET: list[tuple[str, str]] = []
_NET_ON: list[bool] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _NET_ON:
        return
    if event == "socket.getaddrinfo":
        _NET.append((event, str(args[0])))
    elif event == "socket.connect" and isinstance(args[1], tuple):
        _NET.append((event, str(args[1][0])))


@pytest.fixture
def network_log() -> Iterator[list[tuple[str, str]]]:
    """Every name lookup and TCP connect this process makes while the test runs.

    An audit hook (PEP 578) sees them all, in any thread, without patching anything;
    hooks cannot be removed, so one is installed once and switched on per test."""
    if not getattr(sys, "_exec_sandbox_net_audit", False):
        sys.addaudithook(_audit)
        sys._exec_sandbox_net_audit = True  # type: ignore[attr-defined]
    _NET.clear()
    _NET_ON.append(True)
    try:
        yield _NET
    finally:
        _NET_ON.clear()


def test_build_sources_airgap_drops_only_the_public_defaults(tmp_path: Path) -> None:
    base = Settings(cache_dir=tmp_path, mirrors=("http://127.0.0.1:5000/m", f"oci:{tmp_path}"))
    names = [s.name for s in build_sources(base)]
    assert names == [
        "registry http://127.0.0.1:5000/m",
        f"oci:{tmp_path}",
        f"registry {catalog.DEFAULT_REPOSITORY}",
        f"releases {DEFAULT_RELEASES_DOWNLOAD}",
    ]
    assert [type(s) for s in build_sources(base)] == [
        RegistrySource,
        LayoutSource,
        RegistrySource,
        ReleasesSource,
    ]
    airgap = base.with_(airgap=True)
    assert [s.name for s in build_sources(airgap)] == names[:2]
    # Configured by hand, the public hosts are dropped too; loopback ones are kept.
    spelled = airgap.with_(
        mirrors=("docker://ghcr.io/dualeai/exec-sandbox-assets", "ghcr.io/other/copy"),
        releases_url="https://github.com/someone/fork/releases/download",
    )
    assert build_sources(spelled) == []
    local = airgap.with_(releases_url="http://127.0.0.1:8080/r/download")
    assert [s.name for s in build_sources(local)][-1] == "releases http://127.0.0.1:8080/r/download"
    assert [s.name for s in build_sources(base.with_(offline=True))] == [f"oci:{tmp_path}"]


def test_airgap_never_contacts_ghcr_or_github(
    published: Published,
    registry: RegistryServer,
    tmp_path: Path,
    network_log: list[tuple[str, str]],
) -> None:
    """Every local source fails; the public defaults are left as they are, and stay
    untouched: the error names only the local sources, and no lookup or connect
    went anywhere but 127.0.0.1."""
    registry.stop()
    missing = tmp_path / "no-such-layout"
    settings = load_settings(
        env={
            "EXEC_SANDBOX_AIRGAP": "1",
            "EXEC_SANDBOX_REGISTRY_MIRRORS": f"{registry.ref('test/mirror')},oci:{missing}",
            "EXEC_SANDBOX_ASSET_VERSION": VERSION,
            "EXEC_SANDBOX_CACHE_DIR": str(tmp_path / "cache"),
            "EXEC_SANDBOX_TRUSTED_KEYS": str(published.key.public),
        },
    ).with_(local_build_dir=None, host_os="linux", host_goarch="amd64")
    assert settings.registry == catalog.DEFAULT_REPOSITORY
    assert settings.releases_url == DEFAULT_RELEASES_DOWNLOAD

    with pytest.raises(AllSourcesFailedError) as info:
        fetch(settings)

    assert [a.source for a in info.value.attempts] == [
        f"registry {registry.ref('test/mirror')}",
        f"oci:{missing}",
    ]
    assert "unreachable" in info.value.attempts[0].error
    assert "does not exist" in info.value.attempts[1].error
    message = str(info.value)
    assert "ghcr.io" not in message and "github.com" not in message
    assert network_log, "the audit hook saw nothing: it is not working"
    assert {host for _, host in network_log} <= {LOOPBACK, "localhost"}, network_log


def test_a_blob_the_registry_lost_comes_from_the_release(
    registry: RegistryServer, static_server: StaticServer, tmp_path: Path, repo_name: str
) -> None:
    """Index and manifests from the registry, one blob it cannot serve from GitHub:
    blobs are content-addressed, so any source may serve one, and it is verified alike."""
    pub = _publish(tmp_path / "pub", targets=(registry.ref(repo_name),))
    serve(static_server, pub)
    digest = "sha256:" + hashlib.sha256((pub.release_dir / BIG.name).read_bytes()).hexdigest()
    stored_blob_path(registry.data_dir, digest).unlink()
    settings = settings_for(
        tmp_path, pub, releases_url(static_server), registry=registry.ref(repo_name)
    )

    assert_complete(fetch(settings), pub)
    assert requested(static_server) == [BIG.name]  # nothing else was needed from GitHub


async def test_unknown_blob_under_latest_is_not_guessed(
    published: Published, static_server: StaticServer
) -> None:
    from exec_sandbox_assets.release.documents import read_asset_layers

    serve(static_server, published)
    manifest = Manifest.from_bytes(
        (published.release_dir / release_manifest_file("linux", "amd64")).read_bytes(), "m"
    )
    layer = read_asset_layers(manifest, "m")[BIG.name]
    for tag, expected in (("latest", AssetNotFoundError), (TAG, None)):
        source = ReleasesSource(HttpCore(peer="release server"), releases_url(static_server), tag)
        try:
            if expected is None:
                async with source.opener(layer)(0) as chunks:
                    data = b"".join([c async for c in chunks])
                assert data == (published.release_dir / BIG.name).read_bytes()
            else:
                with pytest.raises(expected, match="has not read"):
                    async with source.opener(layer)(0):
                        pass
        finally:
            await source.aclose()
