"""Publishing a release the registry already holds uploads no blob, seen on the wire
(a FaultProxy's request log), not from the publisher's own statistics."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import FaultProxyFactory
from exec_sandbox_assets.publish import PublishResult
from releases import KeyPair, make_key_pair, publish_sample_release
from servers import RegistryServer

pytestmark = pytest.mark.usefixtures("no_docker_config")


def publish_sample(target: str, work_dir: Path, key: KeyPair) -> PublishResult:
    """The same release each time (fixed version, created time and key); a fresh
    `work_dir` compresses it again."""
    return publish_sample_release(
        target,
        "0.9.1",
        work_dir,
        key=key,
        size=16 * 1024,
        created="2026-01-02T03:04:05Z",
        tag_latest=True,
    ).result


def test_second_publish_sends_no_blob_upload_on_the_wire(
    registry: RegistryServer,
    fault_proxy: FaultProxyFactory,
    tmp_path: Path,
    repo_name: str,
) -> None:
    key = make_key_pair(tmp_path / "keys")
    proxy = fault_proxy(registry)
    first = publish_sample(proxy.ref(repo_name), tmp_path / "w1", key)
    uploads = [r for r in proxy.requests if "/blobs/uploads/" in r.path]
    assert uploads, "the first publish uploaded nothing: the proxy sees no traffic"

    proxy.reset()
    second = publish_sample(proxy.ref(repo_name), tmp_path / "w2", key)  # recompresses

    assert proxy.requests, "the second publish went through the proxy"
    sent = [r for r in proxy.requests if "/blobs/uploads/" in r.path]
    # The publisher may open an upload session to check it may push, and cancel it;
    # no blob byte goes up and no upload is completed.
    assert [r for r in sent if r.method in ("PATCH", "PUT")] == []
    assert all(r.headers.get("content-length", "0") == "0" for r in sent), sent
    assert [r.method for r in sent if r.method != "DELETE"] == ["POST"] * len(
        [r for r in sent if r.method == "DELETE"]
    )
    pushed = [r for r in proxy.requests if r.method == "PUT"]
    assert all("/manifests/" in r.path for r in pushed), pushed
    assert (second.index_digest, second.manifest_digests, second.signature_digest) == (
        first.index_digest,
        first.manifest_digests,
        first.signature_digest,
    )
