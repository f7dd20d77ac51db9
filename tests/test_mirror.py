"""`mirror()` between real registries (distribution 2.8, plain, htpasswd, pull-through),
OCI layout directories and archives, and the client reading every copy it makes.

Each copy must keep every digest (index, manifests, blobs, signature), verify the
signature before copying anything, write the tag last, resume after an interruption,
and skip what the destination already has.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import HTPASSWD_USERS, FaultProxyFactory
from exec_sandbox_assets.base.errors import (
    AssetChecksumError,
    AssetNotFoundError,
    ConfigError,
    NoTrustedKeysError,
    SignatureError,
    TransportError,
)
from exec_sandbox_assets.client import AssetClient
from exec_sandbox_assets.config import Settings, load_settings
from exec_sandbox_assets.mirror import MirrorEvent, MirrorResult, mirror
from exec_sandbox_assets.oci.archive import extract_archive
from exec_sandbox_assets.oci.layout import LayoutReader
from exec_sandbox_assets.oci.model import (
    ACCEPT_MANIFESTS,
    MEDIA_TYPE_IMAGE_CONFIG,
    MEDIA_TYPE_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    signature_tag,
)
from exec_sandbox_assets.release import catalog
from exec_sandbox_assets.release.signing import SIMPLESIGNING_MEDIA_TYPE
from releases import (
    KeyPair,
    SampleRelease,
    flip_stored_blob,
    make_key_pair,
    open_writer,
    publish_sample_release,
    resign,
    stored_blob_path,
)
from servers import RegistryServer

SIZE = 160 * 1024
CREATED = "2026-01-02T03:04:05Z"
PLATFORMS = (("linux", "amd64"), ("linux", "arm64"))
SPECS = catalog.platform_assets("linux", "amd64")
SKOPEO = "/usr/bin/skopeo"


# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def docker_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty DOCKER_CONFIG dir: no credentials of the machine leak in."""
    path = tmp_path / "docker-config"
    path.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(path))
    return path


@pytest.fixture
def key(tmp_path: Path) -> KeyPair:
    return make_key_pair(tmp_path / "keys")


@pytest.fixture
def skopeo() -> str:
    found = SKOPEO if Path(SKOPEO).exists() else shutil.which("skopeo")
    if found is None:  # fail, never skip: the interop proof must run
        pytest.fail("skopeo is not installed (Debian: apt-get install -y skopeo)", pytrace=False)
    return found


def release(
    target: str, version: str, tmp_path: Path, key: KeyPair, **kwargs: Any
) -> SampleRelease:
    return publish_sample_release(
        target,
        version,
        tmp_path / "publish",
        key=key,
        size=SIZE,
        created=kwargs.pop("created", CREATED),
        **kwargs,
    )


def copy(
    src: str, dst: str, tmp_path: Path, key: KeyPair, versions: Sequence[str], **kwargs: Any
) -> MirrorResult:
    return mirror(
        src,
        dst,
        versions=versions,
        trusted_keys=[key.public],
        work_dir=kwargs.pop("work_dir", tmp_path / "mirror-work"),
        **kwargs,
    )


def client_settings(tmp_path: Path, key: KeyPair, mirror_ref: str, version: str) -> Settings:
    """A client that knows only `mirror_ref`: air-gapped, so the public defaults are off."""
    return load_settings(
        env={
            "EXEC_SANDBOX_AIRGAP": "1",
            "EXEC_SANDBOX_REGISTRY_MIRRORS": mirror_ref,
            "EXEC_SANDBOX_ASSET_VERSION": version,
            "EXEC_SANDBOX_CACHE_DIR": str(tmp_path / f"cache-{abs(hash(mirror_ref))}"),
            "EXEC_SANDBOX_TRUSTED_KEYS": str(key.public),
            "DOCKER_CONFIG": str(tmp_path / "docker-config"),
        }
    ).with_(local_build_dir=None, host_os="linux", host_goarch="amd64")


def pull(settings: Settings, rel: SampleRelease) -> None:
    """Fetch every asset of linux/amd64 and compare with the build output."""
    paths = asyncio.run(AssetClient(settings).fetch(SPECS))
    assert sorted(paths) == sorted(s.output_name for s in SPECS)
    for spec in SPECS:
        assert paths[spec.output_name].read_bytes() == rel.expected(spec.name), spec.name


def manifest_status(registry: RegistryServer, repo: str, ref: str, auth: Any = None) -> int:
    resp = httpx.head(
        f"{registry.url}/v2/{repo}/manifests/{ref}",
        headers={"Accept": ", ".join(ACCEPT_MANIFESTS)},
        auth=auth,
    )
    return resp.status_code


def get_manifest(registry: RegistryServer, repo: str, ref: str, auth: Any = None) -> bytes:
    resp = httpx.get(
        f"{registry.url}/v2/{repo}/manifests/{ref}",
        headers={"Accept": ", ".join(ACCEPT_MANIFESTS)},
        auth=auth,
    )
    resp.raise_for_status()
    return resp.content


def layout_digests(path: Path, tag: str, archive: bool = False) -> set[str]:
    """Every digest a tag's release holds in a layout: index, manifests, blobs, signature."""
    with LayoutReader.open(path, archive) as reader:
        index_digest = reader.resolve(tag).digest
        sig = reader.resolve(signature_tag(index_digest)).digest
        out = {index_digest, sig}
        index = Index.from_bytes(reader.read_blob(index_digest, 1 << 20), "index")
        docs = [reader.read_blob(d.digest, 1 << 20) for d in index.manifests]
        docs.append(reader.read_blob(sig, 1 << 20))
        out |= {d.digest for d in index.manifests}
        for doc in docs:
            manifest = Manifest.from_bytes(doc, "manifest")
            for blob in (manifest.config, *manifest.layers):
                assert reader.has_blob(blob.digest), blob.digest
                out.add(blob.digest)
    return out


def registry_digests(registry: RegistryServer, repo: str, tag: str, auth: Any = None) -> set[str]:
    import hashlib

    def digest(data: bytes) -> str:
        return "sha256:" + hashlib.sha256(data).hexdigest()

    index_bytes = get_manifest(registry, repo, tag, auth)
    sig_bytes = get_manifest(registry, repo, signature_tag(digest(index_bytes)), auth)
    out = {digest(index_bytes), digest(sig_bytes)}
    docs = [sig_bytes]
    for desc in Index.from_bytes(index_bytes, "index").manifests:
        data = get_manifest(registry, repo, desc.digest, auth)
        assert digest(data) == desc.digest
        out.add(desc.digest)
        docs.append(data)
    for doc in docs:
        manifest = Manifest.from_bytes(doc, "manifest")
        for blob in (manifest.config, *manifest.layers):
            resp = httpx.head(f"{registry.url}/v2/{repo}/blobs/{blob.digest}", auth=auth)
            assert resp.status_code == 200, blob.digest
            out.add(blob.digest)
    return out


# --------------------------------------------------------------------------- registries


def test_mirror_into_an_htpasswd_registry_serves_the_client_alone(
    registry: RegistryServer,
    htpasswd_registry: RegistryServer,
    docker_config: Path,
    tmp_path: Path,
    key: KeyPair,
    repo_name: str,
) -> None:
    """Two versions in one call into a registry that needs a login (docker config.json
    via DOCKER_CONFIG for both the mirror and the client); then the origin stops."""
    first = release(registry.ref(repo_name), "0.9.1", tmp_path, key)
    second = release(registry.ref(repo_name), "0.9.2", tmp_path, key)
    user, password = next(iter(HTPASSWD_USERS.items()))
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (docker_config / "config.json").write_text(
        json.dumps({"auths": {htpasswd_registry.host: {"auth": auth}}})
    )
    dst = htpasswd_registry.ref("site/assets")

    result = copy(registry.ref(repo_name), dst, tmp_path, key, ["0.9.1", "v0.9.2"])

    assert [r.version for r in result.releases] == ["0.9.1", "0.9.2"]
    assert [r.index_digest for r in result.releases] == [first.index_digest, second.index_digest]
    assert result.releases[0].blobs_copied > 0
    # The second version shares every layer and config with the first: only its
    # signature's config and payload are new blobs.
    assert result.releases[1].blobs_copied == 2 and result.releases[1].bytes_copied < 4096
    assert result.releases[1].blobs_skipped == result.releases[0].blobs_copied - 2
    assert all(r.signed_by for r in result.releases)
    creds = (user, password)
    for rel in (first, second):
        assert registry_digests(htpasswd_registry, "site/assets", rel.tag, creds) == (
            registry_digests(registry, repo_name, rel.tag)
        )

    registry.stop()
    pull(client_settings(tmp_path, key, dst, "0.9.2"), second)

    # Run again: every blob is there already, nothing is uploaded, digests unchanged.
    registry.start()
    again = copy(registry.ref(repo_name), dst, tmp_path, key, ["0.9.1", "0.9.2"])
    assert again.blobs_copied == 0 and again.bytes_copied == 0
    assert again.blobs_skipped == sum(r.blobs_copied + r.blobs_skipped for r in result.releases)
    assert [r.index_digest for r in again.releases] == [r.index_digest for r in result.releases]


def test_explicit_docker_config_logs_in_to_the_destination(
    htpasswd_registry: RegistryServer, tmp_path: Path, key: KeyPair
) -> None:
    """`docker_config=` (the CLI passes settings.docker_config) is read for the
    destination too, not only for the source; $DOCKER_CONFIG here is empty."""
    src = f"oci:{tmp_path / 'src'}"
    rel = release(src, "0.9.3", tmp_path, key)
    user, password = next(iter(HTPASSWD_USERS.items()))
    config = tmp_path / "elsewhere.json"
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    config.write_text(json.dumps({"auths": {htpasswd_registry.host: {"auth": auth}}}))

    result = copy(
        src, htpasswd_registry.ref("site/explicit"), tmp_path, key, ["0.9.3"], docker_config=config
    )

    assert result.releases[0].index_digest == rel.index_digest
    assert manifest_status(htpasswd_registry, "site/explicit", rel.tag, (user, password)) == 200


def test_same_registry_mounts_instead_of_copying(
    registry: RegistryServer, tmp_path: Path, key: KeyPair, repo_name: str
) -> None:
    rel = release(registry.ref(repo_name), "0.9.1", tmp_path, key)
    result = copy(registry.ref(repo_name), registry.ref("other/copy"), tmp_path, key, ["0.9.1"])
    (copied,) = result.releases
    assert copied.blobs_copied == 0 and copied.bytes_copied == 0
    assert copied.blobs_mounted > 0
    assert registry_digests(registry, "other/copy", rel.tag) == registry_digests(
        registry, repo_name, rel.tag
    )
    assert "mount=" in registry.log_text()


def test_pull_through_cache_serves_the_client_and_keeps_serving_without_the_origin(
    registry: RegistryServer, tmp_path: Path, key: KeyPair, repo_name: str
) -> None:
    rel = release(registry.ref(repo_name), "0.9.1", tmp_path, key)
    with RegistryServer(tmp_path / "proxy", proxy_remote=registry.url) as cache:
        pull(client_settings(tmp_path / "first", key, cache.ref(repo_name), "0.9.1"), rel)
        # distribution 2.8 stores a proxied blob in a background goroutine that fetches
        # it from the origin a second time: stopping the origin before that finishes
        # leaves the blob uncached. Wait for every blob the client read.
        wanted = [rel.layer(s.name).digest for s in SPECS]
        links = cache.data_dir / "docker/registry/v2/repositories" / repo_name / "_layers"
        deadline = time.monotonic() + 20
        while not all(
            stored_blob_path(cache.data_dir, d).is_file()
            and (links / d.replace(":", "/") / "link").is_file()
            for d in wanted
        ):
            assert time.monotonic() < deadline, "the pull-through cache never stored the blobs"
            time.sleep(0.05)
        registry.stop()
        pull(client_settings(tmp_path / "second", key, cache.ref(repo_name), "0.9.1"), rel)


# --------------------------------------------------------------------------- layouts


def test_sneakernet_registry_archive_layout_registry_keeps_every_digest(
    registry: RegistryServer, tmp_path: Path, key: KeyPair, repo_name: str
) -> None:
    rel = release(registry.ref(repo_name), "0.9.1", tmp_path, key)
    origin = registry_digests(registry, repo_name, rel.tag)
    archive = tmp_path / "usb" / "assets.tar"
    archive.parent.mkdir()

    to_archive = copy(registry.ref(repo_name), f"oci-archive:{archive}", tmp_path, key, ["0.9.1"])
    assert layout_digests(archive, rel.tag, archive=True) == origin
    # The archive is read in place by a client...
    pull(client_settings(tmp_path / "a", key, f"oci-archive:{archive}", "0.9.1"), rel)

    # ... extracted on the other side of the air gap, and also mirrored to a directory.
    extracted = tmp_path / "extracted"
    extract_archive(archive, extracted)
    assert layout_digests(extracted, rel.tag) == origin
    layout = tmp_path / "layout"
    copy(f"oci-archive:{archive}", f"oci:{layout}", tmp_path, key, ["0.9.1"])
    assert layout_digests(layout, rel.tag) == origin

    registry.stop()
    with RegistryServer(tmp_path / "site-registry") as site:
        result = copy(f"oci:{extracted}", site.ref("assets"), tmp_path, key, ["0.9.1"])
        assert registry_digests(site, "assets", rel.tag) == origin
        assert result.releases[0].index_digest == to_archive.releases[0].index_digest
        pull(client_settings(tmp_path / "b", key, site.ref("assets"), "0.9.1"), rel)
    pull(client_settings(tmp_path / "c", key, f"oci:{layout}", "0.9.1"), rel)


def test_skopeo_copy_all_layout_is_read_directly(
    registry: RegistryServer, skopeo: str, tmp_path: Path, key: KeyPair, repo_name: str
) -> None:
    rel = release(registry.ref(repo_name), "0.9.1", tmp_path, key)
    layout = tmp_path / "skopeo-layout"
    src = f"docker://{registry.host}/{repo_name}"
    for tag, extra in ((rel.tag, ["--all"]), (rel.signature_tag, [])):
        proc = subprocess.run(
            [
                skopeo,
                "copy",
                *extra,
                "--preserve-digests",
                "--src-tls-verify=false",
                f"{src}:{tag}",
                f"oci:{layout}:{tag}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
    assert layout_digests(layout, rel.tag) == registry_digests(registry, repo_name, rel.tag)
    registry.stop()
    pull(client_settings(tmp_path, key, f"oci:{layout}", "0.9.1"), rel)


# --------------------------------------------------------------------------- trust


def test_signature_is_verified_before_anything_is_copied(
    registry: RegistryServer, tmp_path: Path, key: KeyPair, repo_name: str
) -> None:
    release(registry.ref(repo_name), "0.9.1", tmp_path, key)
    stranger = make_key_pair(tmp_path / "stranger")
    dst = tmp_path / "out"
    with pytest.raises(SignatureError, match="0 trusted key"):
        copy(registry.ref(repo_name), f"oci:{dst}", tmp_path, stranger, ["0.9.1"])
    assert not dst.exists()
    with pytest.raises(NoTrustedKeysError):
        mirror(registry.ref(repo_name), f"oci:{dst}", versions=["0.9.1"], work_dir=tmp_path / "w")
    assert not dst.exists()
    # Explicitly insecure: copied as is, signature included.
    result = mirror(
        registry.ref(repo_name),
        f"oci:{dst}",
        versions=["0.9.1"],
        work_dir=tmp_path / "w",
        insecure_skip_verify=True,
    )
    assert result.releases[0].signed_by == () and result.releases[0].signature_digest


def test_junk_layers_in_a_signature_manifest_are_neither_fetched_nor_written(
    tmp_path: Path, key: KeyPair
) -> None:
    """A source may list any blobs in the (unsigned) signature manifest; the mirror
    fetches and writes the signatures alone, and the copy still verifies."""
    src, dst = f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'dst'}"
    rel = release(src, "0.9.3", tmp_path, key, platforms=(("linux", "amd64"),))
    clean = resign(rel.index_digest, key, rel.version, rel.created)
    sig = Manifest.from_bytes(clean.manifest, "clean")
    junk = [bytes([n]) * (64 * 1024) for n in range(3)]
    junk_layers = tuple(Descriptor.for_bytes("application/octet-stream", j) for j in junk)
    dirty = Manifest(config=sig.config, layers=(*sig.layers, *junk_layers)).to_bytes()
    writer = open_writer(src, tmp_path / "tamper")
    try:
        writer.push_bytes(clean.config, MEDIA_TYPE_IMAGE_CONFIG)
        for blob in (*clean.payloads, *junk):
            writer.push_bytes(blob, "application/octet-stream")
        writer.put_manifest(dirty, MEDIA_TYPE_MANIFEST, signature_tag(rel.index_digest))
    finally:
        writer.close(True)
    # Listed but not there: fetching any of them would fail the mirror.
    for layer in junk_layers:
        (tmp_path / "src" / "blobs" / "sha256" / layer.digest.partition(":")[2]).unlink()

    result = copy(src, dst, tmp_path, key, ["0.9.3"])

    with LayoutReader.open(tmp_path / "dst") as reader:
        written = reader.read_blob(reader.resolve(signature_tag(rel.index_digest)).digest, 1 << 20)
        layers = Manifest.from_bytes(written, "dst signature").layers
        assert [d.media_type for d in layers] == [SIMPLESIGNING_MEDIA_TYPE]
        assert not any(reader.has_blob(d.digest) for d in junk_layers)
    assert result.releases[0].blobs_copied > 0
    pull(client_settings(tmp_path, key, dst, "0.9.3"), rel)


def test_platform_filter_cannot_split_a_signed_index(
    registry: RegistryServer, tmp_path: Path, key: KeyPair, repo_name: str
) -> None:
    release(registry.ref(repo_name), "0.9.1", tmp_path, key)
    dst = tmp_path / "out"
    with pytest.raises(AssetNotFoundError, match="darwin/arm64"):
        copy(
            registry.ref(repo_name), f"oci:{dst}", tmp_path, key, ["0.9.1"],
            platforms=[("darwin", "arm64"), *PLATFORMS],
        )  # fmt: skip
    assert not dst.exists()
    # A check, not a filter: asking for one platform still copies the whole signed index.
    result = copy(
        registry.ref(repo_name), f"oci:{dst}", tmp_path, key, ["0.9.1"],
        platforms=[("linux", "amd64")],
    )  # fmt: skip
    assert set(result.releases[0].manifest_digests) == set(PLATFORMS)


def test_a_version_tag_is_never_moved(
    registry: RegistryServer, tmp_path: Path, key: KeyPair, repo_name: str
) -> None:
    release(registry.ref(repo_name), "0.9.1", tmp_path, key)
    dst = tmp_path / "out"
    other = release(f"oci:{dst}", "0.9.1", tmp_path, key, created="2025-05-05T05:05:05Z")
    with pytest.raises(ConfigError, match="does not move its tag"):
        copy(registry.ref(repo_name), f"oci:{dst}", tmp_path, key, ["0.9.1"])
    with LayoutReader.open(dst) as reader:
        assert reader.resolve(other.tag).digest == other.index_digest


def test_latest_copies_the_version_tag_too(
    registry: RegistryServer, tmp_path: Path, key: KeyPair, repo_name: str
) -> None:
    rel = release(registry.ref(repo_name), "0.9.1", tmp_path, key, tag_latest=True)
    dst = tmp_path / "out"
    result = copy(registry.ref(repo_name), f"oci:{dst}", tmp_path, key, ["latest"])
    assert result.releases[0].tags == (rel.tag, "latest")
    with LayoutReader.open(dst) as reader:
        assert reader.resolve("latest").digest == reader.resolve(rel.tag).digest


# --------------------------------------------------------------------------- interruptions


def test_killed_destination_then_rerun_completes_and_tags_last(
    registry: RegistryServer, tmp_path: Path, key: KeyPair, repo_name: str
) -> None:
    rel = release(registry.ref(repo_name), "0.9.1", tmp_path, key)
    with RegistryServer(tmp_path / "dst") as dst:
        done: list[str] = []

        def kill_after_two(event: MirrorEvent) -> None:
            if event.kind == "blob-done":
                done.append(event.digest)
                if len(done) == 2:
                    dst.kill()

        with pytest.raises(TransportError):
            copy(
                registry.ref(repo_name), dst.ref("assets"), tmp_path, key, ["0.9.1"],
                progress=kill_after_two,
            )  # fmt: skip
        dst.start()
        assert manifest_status(dst, "assets", rel.tag) == 404
        assert manifest_status(dst, "assets", rel.index_digest) == 404

        events: list[tuple[str, int]] = []

        def watch(event: MirrorEvent) -> None:
            # The tag must not exist until the very end, whatever happened before.
            events.append((event.kind, manifest_status(dst, "assets", rel.tag)))

        result = copy(
            registry.ref(repo_name), dst.ref("assets"), tmp_path, key, ["0.9.1"], progress=watch
        )
        assert result.releases[0].blobs_skipped >= 2
        kinds = [k for k, _ in events]
        assert kinds[-1] == "tag" and kinds.count("tag") == 1
        assert all(status == 404 for _, status in events[:-1])
        assert events[-1][1] == 200
        assert kinds.index("signature") > kinds.index("index") > kinds.index("manifest")
        registry.stop()
        pull(client_settings(tmp_path, key, dst.ref("assets"), "0.9.1"), rel)


def test_cut_source_download_resumes_by_range_in_the_call_and_across_runs(
    registry: RegistryServer,
    fault_proxy: FaultProxyFactory,
    tmp_path: Path,
    key: KeyPair,
    repo_name: str,
) -> None:
    rel = release(registry.ref(repo_name), "0.9.1", tmp_path, key)
    big = rel.layer(catalog.base_image("python", "x86_64").name)
    proxy = fault_proxy(registry)
    proxy.match_path = f"/blobs/{big.digest}"
    step = big.size // 10
    proxy.cut_after_bytes = step

    # Cut every time: each resume adds `step` bytes, then the call gives up...
    with pytest.raises(TransportError, match="broke off"):
        copy(proxy.ref(repo_name), f"oci:{tmp_path / 'a'}", tmp_path, key, ["0.9.1"])
    ranges = [r.headers.get("range") for r in proxy.requests if big.digest in r.path]
    assert ranges[0] is None
    assert ranges[1:] == [f"bytes={step * n}-" for n in range(1, len(ranges))]
    kept = step * len(ranges)

    # ... and the next run starts where the partial in work_dir ends.
    proxy.reset()
    proxy.match_path = f"/blobs/{big.digest}"
    proxy.cut_after_bytes = step
    proxy.cut_times = 1
    copy(proxy.ref(repo_name), f"oci:{tmp_path / 'a'}", tmp_path, key, ["0.9.1"])
    ranges = [r.headers.get("range") for r in proxy.requests if big.digest in r.path]
    assert ranges == [f"bytes={kept}-", f"bytes={kept + step}-"]
    assert layout_digests(tmp_path / "a", rel.tag) == registry_digests(registry, repo_name, rel.tag)
    assert not (tmp_path / "mirror-work" / "download").exists()  # cleaned after success


def test_a_flipped_byte_stops_the_copy_at_its_chunk_and_tags_nothing(
    registry: RegistryServer, tmp_path: Path, key: KeyPair, repo_name: str
) -> None:
    python = catalog.base_image("python", "x86_64")
    # Several 4 MiB chunks once compressed (the samples compress ~4:1).
    rel = release(
        registry.ref(repo_name), "0.9.1", tmp_path, key, sizes={python.output_name: 40 << 20}
    )
    big = rel.layer(python.name)
    flip_stored_blob(registry.data_dir, big.digest, offset=(4 << 20) + 7)
    dst = tmp_path / "out"
    with pytest.raises(AssetChecksumError, match=f"chunk 1 .* of blob {big.digest}"):
        copy(registry.ref(repo_name), f"oci:{dst}", tmp_path, key, ["0.9.1"])
    assert not (dst / "index.json").exists() or rel.tag not in (dst / "index.json").read_text()
