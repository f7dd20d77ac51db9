"""A tag never points at an unsigned or incomplete release: the signature manifest is
pushed and read back verified before `vV` and `latest` are set.

Other publisher tests fail the publish *before* the index; here the index is in and
the signature push fails, or the signature reads back wrong, and no tag may exist.
Once the fault is gone, a re-run completes the release.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest

from conftest import FaultProxyFactory
from exec_sandbox_assets.oci.model import ACCEPT_MANIFESTS, MEDIA_TYPE_MANIFEST, signature_tag
from exec_sandbox_assets.publish import PublishResult
from exec_sandbox_assets.release import keys, policy, signing
from releases import KeyPair, make_key_pair, publish_sample_release
from servers import FaultProxy, RegistryServer

pytestmark = pytest.mark.usefixtures("no_docker_config")

VERSION = "0.9.1"
TAG = f"v{VERSION}"
CREATED = "2026-01-02T03:04:05Z"


@pytest.fixture
def key(tmp_path: Path) -> KeyPair:
    return make_key_pair(tmp_path / "keys")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def publish_to(target: str, tmp_path: Path, key: KeyPair) -> PublishResult:
    """The sample release as VERSION, tagged `vV` and `latest`, always the same bytes."""
    return publish_sample_release(
        target, VERSION, tmp_path / "w", key=key, size=16 * 1024, created=CREATED, tag_latest=True
    ).result


def manifest_status(registry: RegistryServer, repo: str, ref: str) -> int:
    resp = httpx.head(
        f"{registry.url}/v2/{repo}/manifests/{ref}",
        headers={"Accept": ", ".join(ACCEPT_MANIFESTS)},
    )
    assert resp.status_code in (200, 404), resp.status_code
    return resp.status_code


def assert_verified_release(
    registry: RegistryServer, repo: str, result: PublishResult, public: Path
) -> None:
    """Both tags point at the index, whose signature verifies with `public`."""
    for tag in (TAG, "latest"):
        resp = httpx.get(
            f"{registry.url}/v2/{repo}/manifests/{tag}",
            headers={"Accept": ", ".join(ACCEPT_MANIFESTS)},
        )
        assert resp.status_code == 200 and sha256(resp.content) == result.index_digest, tag
    sig = httpx.get(
        f"{registry.url}/v2/{repo}/manifests/{signature_tag(result.index_digest)}",
        headers={"Accept": MEDIA_TYPE_MANIFEST},
    ).content
    signatures = [
        (
            httpx.get(f"{registry.url}/v2/{repo}/blobs/{layer.payload_digest}").content,
            layer.signature,
        )
        for layer in signing.read_signature_manifest(sig, "test")
    ]
    policy.verify_index(
        policy.TrustPolicy(keys=(keys.load_public_key_file(public),)),
        result.index_digest,
        signatures,
        expected_version=VERSION,
        newest_accepted_created=None,
        where="test",
    )


def assert_untagged_then_rerun_completes(
    registry: RegistryServer,
    proxy: FaultProxy,
    repo_name: str,
    tmp_path: Path,
    key: KeyPair,
) -> None:
    """No tag names the failed release; once the fault is gone a re-run completes it."""
    assert manifest_status(registry, repo_name, TAG) == 404
    assert manifest_status(registry, repo_name, "latest") == 404
    proxy.reset()
    result = publish_to(proxy.ref(repo_name), tmp_path, key)
    assert_verified_release(registry, repo_name, result, key.public)


def test_a_failed_signature_push_leaves_no_tag_and_a_rerun_completes(
    registry: RegistryServer,
    fault_proxy: FaultProxyFactory,
    key: KeyPair,
    tmp_path: Path,
    repo_name: str,
) -> None:
    """Blobs, manifests and the index are in; the signature manifest cannot be written:
    neither `vV` nor `latest` may exist (a client would find an unsigned release)."""
    proxy = fault_proxy(registry)
    # Every request on the signature tag is answered 404 by the proxy: the publisher's
    # "is there a signature to reuse?" read sees what the registry would say, and the
    # PUT of the signature manifest fails (as a registry refusing it would).
    proxy.match_path = "/manifests/sha256-"
    proxy.fail_first, proxy.fail_status = 1000, 404

    with pytest.raises(Exception) as info:
        publish_to(proxy.ref(repo_name), tmp_path, key)

    puts = [r for r in proxy.requests if r.method == "PUT" and "/manifests/sha256-" in r.path]
    assert puts, f"the signature PUT was never attempted: {info.value!r}"
    index_puts = [r for r in proxy.requests if r.method == "PUT" and "/manifests/sha256:" in r.path]
    assert index_puts, "the failure came before the manifests: not the case under test"
    assert_untagged_then_rerun_completes(registry, proxy, repo_name, tmp_path, key)


def test_a_signature_that_reads_back_wrong_leaves_no_tag(
    registry: RegistryServer,
    fault_proxy: FaultProxyFactory,
    key: KeyPair,
    tmp_path: Path,
    repo_name: str,
) -> None:
    """The publisher reads the signature back and verifies it before tagging: a registry
    that stores or serves it damaged gets no tag."""
    proxy = fault_proxy(registry)
    proxy.match_path = "/manifests/sha256-"
    # Past the end of the registry's 404 answer (~170 bytes), inside the manifest.
    proxy.flip_byte_at = 300

    with pytest.raises(Exception):
        publish_to(proxy.ref(repo_name), tmp_path, key)

    gets = [r for r in proxy.requests if r.method == "GET" and "/manifests/sha256-" in r.path]
    assert [r.status for r in gets][-1] == 200, "the signature was never read back"
    assert_untagged_then_rerun_completes(registry, proxy, repo_name, tmp_path, key)
