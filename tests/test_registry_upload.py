"""How a registry target uploads a blob: whole in one PATCH (as docker and skopeo do),
and in 4 MiB chunks from the first refusal on (ghcr.io caps a chunk at 4 MiB; proxies
cap request bodies), against a real registry behind a FaultProxy."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import httpx
import pytest

from conftest import FaultProxyFactory
from exec_sandbox_assets.oci.registry_target import CHUNK_SIZE, RegistryTarget, _mapped
from servers import RegistryServer

pytestmark = pytest.mark.usefixtures("no_docker_config")


def blob(tmp_path: Path, name: str, size: int) -> tuple[Path, str]:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path, "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def stored(registry: RegistryServer, repo: str, digest: str) -> bytes:
    resp = httpx.get(f"{registry.url}/v2/{repo}/blobs/{digest}", follow_redirects=True)
    resp.raise_for_status()
    return resp.content


def test_a_blob_goes_up_in_one_patch(
    registry: RegistryServer, fault_proxy: FaultProxyFactory, tmp_path: Path, repo_name: str
) -> None:
    path, digest = blob(tmp_path, "big", 2 * CHUNK_SIZE + 123)
    proxy = fault_proxy(registry)
    target = RegistryTarget.connect(proxy.ref(repo_name))
    target.push_blob(path, digest, path.stat().st_size)
    target.close(True)

    patches = [r for r in proxy.requests if r.method == "PATCH"]
    assert [int(r.headers["content-length"]) for r in patches] == [path.stat().st_size]
    assert "content-range" not in patches[0].headers
    assert stored(registry, repo_name, digest) == path.read_bytes()
    assert (target.stats.blobs_uploaded, target.stats.bytes_uploaded) == (1, path.stat().st_size)


def test_a_refused_whole_upload_is_done_again_in_chunks_and_so_are_the_next(
    registry: RegistryServer, fault_proxy: FaultProxyFactory, tmp_path: Path, repo_name: str
) -> None:
    first, first_digest = blob(tmp_path, "first", 2 * CHUNK_SIZE + 123)
    second, second_digest = blob(tmp_path, "second", CHUNK_SIZE + 5)
    proxy = fault_proxy(registry)
    target = RegistryTarget.connect(proxy.ref(repo_name))
    # What ghcr.io answers a PATCH over its cap: 416 "the request body is too large".
    proxy.match_path, proxy.fail_first, proxy.fail_status = "_state=", 1, 416
    target.push_blob(first, first_digest, first.stat().st_size)
    target.push_blob(second, second_digest, second.stat().st_size)
    target.close(True)

    sizes = [int(r.headers["content-length"]) for r in proxy.requests if r.method == "PATCH"]
    assert sizes[0] == first.stat().st_size  # the refused one
    assert sizes[1:] == [CHUNK_SIZE, CHUNK_SIZE, 123, CHUNK_SIZE, 5]
    assert stored(registry, repo_name, first_digest) == first.read_bytes()
    assert stored(registry, repo_name, second_digest) == second.read_bytes()
    assert target.stats.blobs_uploaded == 2


def test_the_body_of_a_whole_upload_can_be_sent_again(
    registry: RegistryServer, tmp_path: Path, repo_name: str
) -> None:
    """oras answers a 401 (a token that expired during a long publish) by sending the
    same request again, body object included: the mapped body sends all its bytes
    every time, where a file object would send nothing the second time."""
    path, digest = blob(tmp_path, "again", CHUNK_SIZE + 77)
    target = RegistryTarget.connect(registry.ref(repo_name))
    session = target._session
    with _mapped(path) as body:
        for _ in range(2):  # a first, complete sending, then the same body once more
            started = session.request(f"{registry.url}/v2/{repo_name}/blobs/uploads/", "POST")
            url = session.upload_url(started)
            assert started.status_code == 202 and url
            sent = session.request(url, "PATCH", data=body)
            url = session.upload_url(sent)
            assert sent.status_code == 202 and url
            done = session.request(f"{url}&digest={digest}", "PUT")
            assert done.status_code == 201, done.text
    target.close(True)
    assert stored(registry, repo_name, digest) == path.read_bytes()
