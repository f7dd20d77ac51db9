"""Blobs are pushed while the next file compresses (publish/pipeline.py), without
giving up what the publisher promises: nothing is uploaded before bad input or a
conflicting tag is refused, a failed push stops the publish with the registry's
error and leaves no tag, and a re-run completes."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import zstandard

from conftest import FaultProxyFactory
from exec_sandbox_assets.base.errors import AssetDownloadError, AuthError, ConfigError
from exec_sandbox_assets.oci.model import ACCEPT_MANIFESTS
from exec_sandbox_assets.publish import PublishRequest, PublishResult, make_sample_inputs, publish
from exec_sandbox_assets.publish.compress import Blob
from exec_sandbox_assets.publish.inputs import find_inputs
from exec_sandbox_assets.publish.pipeline import prepare_blobs
from exec_sandbox_assets.release import keys
from servers import FaultProxy, RegistryServer, RequestRecord

VERSION = "0.9.2"
TAG = f"v{VERSION}"
CREATED = "2026-01-02T03:04:05Z"
PLATFORM = (("linux", "amd64"),)


@pytest.fixture(autouse=True)
def no_docker_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "docker-config"
    path.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(path))


@pytest.fixture
def dist(tmp_path: Path) -> Path:
    return make_sample_inputs(tmp_path / "dist", ("x86_64",), ("linux",), 40 * 1024)


@pytest.fixture
def key(tmp_path: Path) -> Path:
    keys.write_key_pair(keys.generate_key(), tmp_path / "k.key", tmp_path / "k.pub", None)
    return tmp_path / "k.key"


@pytest.fixture
def proxy(registry: RegistryServer, fault_proxy: FaultProxyFactory) -> FaultProxy:
    """The registry behind a FaultProxy (its request log, injected failures)."""
    return fault_proxy(registry)


Publish = Callable[..., PublishResult]


@pytest.fixture
def run(dist: Path, key: Path, tmp_path: Path) -> Publish:
    """publish(target, **request fields): the sample release, one work dir for all runs."""

    def go(target: str, **kwargs: Any) -> PublishResult:
        options: dict[str, Any] = {"created": CREATED, "level": 3, "platforms": PLATFORM}
        options.update(kwargs)
        return publish(
            PublishRequest(
                inputs=(dist,),
                version=VERSION,
                targets=(target,),
                keys=(key,),
                work_dir=tmp_path / "w",
                **options,
            )
        )

    return go


def blob_uploads(proxy: FaultProxy) -> list[RequestRecord]:
    """Requests that carry blob bytes or complete an upload (not the push-rights probe)."""
    return [
        r for r in proxy.requests if "/blobs/uploads/" in r.path and r.method in ("PATCH", "PUT")
    ]


def repositories(registry: RegistryServer) -> list[str]:
    return httpx.get(f"{registry.url}/v2/_catalog").json().get("repositories") or []


def tag_exists(registry: RegistryServer, repo: str) -> bool:
    resp = httpx.head(
        f"{registry.url}/v2/{repo}/manifests/{TAG}",
        headers={"Accept": ", ".join(ACCEPT_MANIFESTS)},
    )
    return resp.status_code == 200


def test_a_corrupt_zst_input_fails_before_any_upload(
    registry: RegistryServer, run: Publish, dist: Path, repo_name: str
) -> None:
    # A raw file to compress, and a pre-compressed one that is cut short: the check of
    # the inputs taken as they are comes before the first compression, hence before the
    # first push.
    raw = dist / "initramfs-x86_64"
    data = zstandard.ZstdCompressor().compress(raw.read_bytes())
    (dist / "initramfs-x86_64.zst").write_bytes(data[: len(data) // 2])
    raw.unlink()
    with pytest.raises(ConfigError, match=r"initramfs-x86_64\.zst: .*(corrupt|truncated)"):
        run(registry.ref(repo_name))
    assert repo_name not in repositories(registry)


def test_an_existing_tag_with_other_content_is_refused_before_any_upload(
    registry: RegistryServer, proxy: FaultProxy, run: Publish, dist: Path, repo_name: str
) -> None:
    run(proxy.ref(repo_name))
    (dist / "vmlinux-x86_64").write_bytes(b"rebuilt kernel")
    proxy.reset()
    with pytest.raises(ConfigError, match="refusing to move a release tag"):
        run(proxy.ref(repo_name))
    assert blob_uploads(proxy) == []  # the new kernel's blob was not pushed early

    proxy.reset()
    replaced = run(proxy.ref(repo_name), replace=True)
    assert replaced.blobs_uploaded >= 1 and tag_exists(registry, repo_name)


def test_a_failed_blob_push_stops_the_publish_and_a_rerun_completes(
    registry: RegistryServer, proxy: FaultProxy, run: Publish, dist: Path, repo_name: str
) -> None:
    # Upload sessions (PATCH/PUT .../uploads/ID?_state=...) are refused; the probe's POST
    # is not, so the publish starts, and the error comes from the pushing thread.
    proxy.match_path, proxy.fail_first, proxy.fail_status = "_state=", 10**6, 400
    with pytest.raises(
        AssetDownloadError, match=r"uploading gvproxy-wrapper-linux-amd64 .*failed 3"
    ):
        run(proxy.ref(repo_name))
    assert not tag_exists(registry, repo_name)

    proxy.reset()
    result = run(proxy.ref(repo_name))
    assert tag_exists(registry, repo_name)
    assert result.blobs_uploaded + result.blobs_skipped >= 7


def test_blobs_are_made_in_input_order_with_checked_inputs_first(
    dist: Path, tmp_path: Path
) -> None:
    """`on_ready` sees the inputs taken as they are first (all checked before the first
    push), then the files to compress: the small ones, then the rest largest first (the
    upload order); the result keeps input order."""
    (dist / "vmlinux-x86_64").write_bytes(b"k" * 200_000)  # now the largest to compress
    (dist / "vmlinuz-x86_64").write_bytes(b"z" * 1_000)  # under 1/16 of the total: small
    zst = zstandard.ZstdCompressor().compress((dist / "initramfs-x86_64").read_bytes())
    (dist / "initramfs-x86_64.zst").write_bytes(zst)
    (dist / "initramfs-x86_64").unlink()
    inputs = find_inputs((dist,), PLATFORM)
    seen: list[Blob] = []
    blobs = prepare_blobs(inputs, tmp_path / "w", 3, on_ready=seen.append)

    assert list(blobs) == [f.spec.name for f in inputs.files]
    by_name = {f.spec.name: f for f in inputs.files}
    names = [next(n for n, b in blobs.items() if b is s) for s in seen]
    assert set(names[:2]) == {"initramfs-x86_64.zst", "gvproxy-wrapper-linux-amd64"}
    assert names[2:4] == ["vmlinuz-x86_64.zst", "vmlinux-x86_64.zst"]
    sizes = [by_name[n].path.stat().st_size for n in names[3:]]
    assert sizes == sorted(sizes, reverse=True)
    for name, blob in blobs.items():
        assert blob.digest == "sha256:" + hashlib.sha256(blob.path.read_bytes()).hexdigest(), name


def test_a_refused_registry_stops_the_compression_and_leaves_no_temp_file(
    htpasswd_registry: RegistryServer, run: Publish, dist: Path, tmp_path: Path, repo_name: str
) -> None:
    """Compression starts before the targets are connected; when a target refuses us,
    it stops at its next chunk, and publish() returns only once it has let go of the
    work dir (a caller may delete it): no thread left, no temp file, no blob."""
    big = dist / "python-3.14-base-x86_64.qcow2"
    big.write_bytes(os.urandom(1 << 20) * 16)  # 16 MiB: seconds at level 19
    with pytest.raises(AuthError, match="requires a login"):
        run(htpasswd_registry.ref(repo_name), level=19)
    assert not [t for t in threading.enumerate() if t.name == "publish-compress"]
    compressed = tmp_path / "w" / "compressed"
    left = sorted(p.name for p in compressed.iterdir()) if compressed.exists() else []
    assert not [n for n in left if n.startswith(".tmp-")], left
    assert "python-3.14-base-x86_64.qcow2.zst" not in left, left


def test_a_damaged_compression_cache_is_compressed_again(dist: Path, tmp_path: Path) -> None:
    """The work dir is written without fsync (a cache): what a crash can leave there, a
    cut or zeroed blob beside its record, or a torn record, is compressed again, never
    reused, and the blobs come out the same."""
    inputs = find_inputs((dist,), PLATFORM)
    first = prepare_blobs(inputs, tmp_path / "w", 3)
    cut = first["vmlinux-x86_64.zst"].path
    cut.write_bytes(cut.read_bytes()[:100])
    zeroed = first["initramfs-x86_64.zst"].path
    zeroed.write_bytes(bytes(zeroed.stat().st_size))
    torn = first["vmlinuz-x86_64.zst"].path
    torn.with_name(torn.name + ".json").write_text('{"source_digest": "sha2')

    again = prepare_blobs(inputs, tmp_path / "w", 3)
    assert again == first
    for blob in again.values():
        assert blob.digest == "sha256:" + hashlib.sha256(blob.path.read_bytes()).hexdigest()
