"""Acceptance claims of issues #2, #3 and #5 that the other test files left unproven or
proved only through a counter the code keeps about itself (an audit found each of these
by breaking the code path and seeing no test fail).

- #2 "a tag never points at an unsigned or incomplete release": the publisher used to be
  tested only with a failure *before* the index; here the signature push fails, or the
  signature reads back wrong, and no tag may exist.
- #2 "the second publish uploads no blob", seen on the wire (a FaultProxy's request
  log), not from the publisher's own statistics.
- #3 "redirects to a blob CDN followed without sending the registry's credentials
  there": also once the client already holds credentials for the registry, when a
  hostile CDN answers with its own challenge.
- #3 a certificate failure is not retried: counted in TCP connections, not in seconds
  (test_registry_client.py bounds it with a wall clock).
- #5 release.yml asks for `packages: write` (and `contents: write` for the release
  upload) in the publish job only, and nothing broader anywhere.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import HTPASSWD_USERS, FaultProxyFactory
from exec_sandbox_assets.errors import AssetDownloadError, AssetNotFoundError, AuthError
from exec_sandbox_assets.oci.auth import Credentials
from exec_sandbox_assets.oci.http import RetryPolicy
from exec_sandbox_assets.oci.model import (
    ACCEPT_MANIFESTS,
    EMPTY_DESCRIPTOR,
    EMPTY_JSON,
    MEDIA_TYPE_MANIFEST,
    Descriptor,
    Manifest,
    signature_tag,
)
from exec_sandbox_assets.oci.reference import parse_registry_ref
from exec_sandbox_assets.oci.registry import RegistryClient
from exec_sandbox_assets.publish import PublishRequest, PublishResult, make_sample_inputs, publish
from exec_sandbox_assets.release import keys, policy, signing
from servers import LOOPBACK, FaultProxy, HostileCdn, RedirectingRegistry, RegistryServer, TcpRelay

ROOT = Path(__file__).resolve().parent.parent
VERSION = "0.9.1"
TAG = f"v{VERSION}"
CREATED = "2026-01-02T03:04:05Z"
PLATFORMS = (("linux", "amd64"), ("linux", "arm64"))


@pytest.fixture(autouse=True)
def no_docker_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty docker config dir, so no credentials of the machine leak in."""
    path = tmp_path / "docker-config"
    path.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(path))
    return path


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- #2 publisher


@pytest.fixture
def key(tmp_path: Path) -> tuple[Path, Path]:
    """(private, public) of a fresh ECDSA P-256 key."""
    private, public = tmp_path / "release.key", tmp_path / "release.pub"
    keys.write_key_pair(keys.generate_key(), private, public, None)
    return private, public


def publish_to(target: str, tmp_path: Path, private: Path, work: str = "w") -> PublishResult:
    dist = tmp_path / "dist"
    if not dist.exists():
        make_sample_inputs(dist, size=16 * 1024)
    return publish(
        PublishRequest(
            inputs=(dist,),
            version=VERSION,
            targets=(target,),
            keys=(private,),
            work_dir=tmp_path / work,
            platforms=PLATFORMS,
            tag_latest=True,
            created=CREATED,
            level=3,
        )
    )


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
    key: tuple[Path, Path],
) -> None:
    """No tag names the failed release; once the fault is gone a re-run completes it."""
    assert manifest_status(registry, repo_name, TAG) == 404
    assert manifest_status(registry, repo_name, "latest") == 404
    proxy.reset()
    result = publish_to(proxy.ref(repo_name), tmp_path, key[0])
    assert_verified_release(registry, repo_name, result, key[1])


def test_a_failed_signature_push_leaves_no_tag_and_a_rerun_completes(
    registry: RegistryServer,
    fault_proxy: FaultProxyFactory,
    key: tuple[Path, Path],
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
        publish_to(proxy.ref(repo_name), tmp_path, key[0])

    puts = [r for r in proxy.requests if r.method == "PUT" and "/manifests/sha256-" in r.path]
    assert puts, f"the signature PUT was never attempted: {info.value!r}"
    index_puts = [r for r in proxy.requests if r.method == "PUT" and "/manifests/sha256:" in r.path]
    assert index_puts, "the failure came before the manifests: not the case under test"
    assert_untagged_then_rerun_completes(registry, proxy, repo_name, tmp_path, key)


def test_a_signature_that_reads_back_wrong_leaves_no_tag(
    registry: RegistryServer,
    fault_proxy: FaultProxyFactory,
    key: tuple[Path, Path],
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
        publish_to(proxy.ref(repo_name), tmp_path, key[0])

    gets = [r for r in proxy.requests if r.method == "GET" and "/manifests/sha256-" in r.path]
    assert [r.status for r in gets][-1] == 200, "the signature was never read back"
    assert_untagged_then_rerun_completes(registry, proxy, repo_name, tmp_path, key)


def test_second_publish_sends_no_blob_upload_on_the_wire(
    registry: RegistryServer,
    fault_proxy: FaultProxyFactory,
    key: tuple[Path, Path],
    tmp_path: Path,
    repo_name: str,
) -> None:
    proxy = fault_proxy(registry)
    first = publish_to(proxy.ref(repo_name), tmp_path, key[0], work="w1")
    uploads = [r for r in proxy.requests if "/blobs/uploads/" in r.path]
    assert uploads, "the first publish uploaded nothing: the proxy sees no traffic"

    proxy.reset()
    second = publish_to(proxy.ref(repo_name), tmp_path, key[0], work="w2")  # recompresses

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


# --------------------------------------------------------------------------- #3 client


@pytest.fixture
def hostile_cdn() -> Iterator[HostileCdn]:
    with HostileCdn() as cdn:
        yield cdn


def _push(server: RegistryServer, repo: str, auth: tuple[str, str], blob: bytes) -> None:
    """Monolithic uploads of an empty config and `blob`, then a manifest tagged v1."""
    with httpx.Client(base_url=server.url, auth=auth) as client:
        for data in (EMPTY_JSON, blob):
            start = client.post(f"/v2/{repo}/blobs/uploads/")
            assert start.status_code == 202, start.text
            location = start.headers["location"]
            sep = "&" if "?" in location else "?"
            done = client.put(f"{location}{sep}digest={sha256(data)}", content=data)
            assert done.status_code == 201, done.text
        manifest = Manifest(
            config=EMPTY_DESCRIPTOR,
            layers=(Descriptor.for_bytes("application/vnd.exec-sandbox.kernel.v1+zstd", blob),),
            artifact_type="application/vnd.exec-sandbox.assets.v1",
        ).to_bytes()
        put = client.put(
            f"/v2/{repo}/manifests/v1",
            content=manifest,
            headers={"Content-Type": MEDIA_TYPE_MANIFEST},
        )
        assert put.status_code == 201, put.text


async def test_cdn_challenge_is_ignored_once_the_client_holds_credentials(
    hostile_cdn: HostileCdn, tmp_path: Path, repo_name: str
) -> None:
    """A first request teaches the client that the registry wants Basic credentials;
    from then on every request carries them at once. A blob GET then ends at a CDN
    that challenges for a token: the client must not answer it (with the registry's
    password in the token request) nor send anything there but the bare redirect."""
    port, seen = hostile_cdn.port, hostile_cdn.seen
    user, password = next(iter(HTPASSWD_USERS.items()))
    blob = b"kernel bytes " * 1000
    server = RedirectingRegistry(
        tmp_path / "reg", f"http://localhost:{port}", auth="htpasswd", users={user: password}
    )
    with server:
        _push(server, repo_name, (user, password), blob)
        ref = parse_registry_ref(f"{server.url}/{repo_name}")
        retry = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.02)
        async with RegistryClient(ref, credentials=Credentials(user, password), retry=retry) as c:
            data, _, _ = await c.get_manifest("v1")  # authenticated: Basic from now on
            assert Manifest.from_bytes(data, "v1").layers[0].digest == sha256(blob)
            with pytest.raises(AuthError) as info:
                await c.get_blob(sha256(blob), len(blob))
    assert "redirect target" in str(info.value)
    assert seen, "the blob GET never reached the CDN: not the case under test"
    assert [path for path, _ in seen if path.startswith("/steal")] == []
    assert [auth for _, auth in seen if auth is not None] == []
    basic = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    assert all(auth != basic for _, auth in seen)


async def test_an_untrusted_certificate_is_not_retried(
    tls_registry: RegistryServer, repo_name: str
) -> None:
    """Counted in TCP connections, not in seconds: with a policy of 4 attempts, a
    certificate the client does not trust costs exactly one connection."""
    relay = TcpRelay((LOOPBACK, tls_registry.port))
    try:
        ref = parse_registry_ref(f"{relay.host}/{repo_name}")
        assert ref.scheme == "https"
        retry = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.02)
        async with RegistryClient(ref, retry=retry) as client:
            with pytest.raises(AssetDownloadError, match="not trusted"):
                await client.get_manifest("v1")
        assert relay.connections == 1
        # With the CA the same path gets an answer: the relay is not what failed above.
        async with RegistryClient(ref, ca_bundle=tls_registry.ca_bundle, retry=retry) as client:
            with pytest.raises(AssetNotFoundError):
                await client.get_manifest("v1")
    finally:
        relay.close()


# --------------------------------------------------------------------------- #5 workflows


def job_permissions(workflow: Path) -> tuple[dict[str, str] | None, dict[str, dict[str, str]]]:
    """(top-level permissions, {job: permissions}) read from a workflow's YAML text.

    A small reader for the two shapes used here: `permissions: {}` / `permissions:
    read-all` on one line, or a block of `scope: level` lines indented under it."""
    lines = workflow.read_text().splitlines()

    def block(start: int, indent: int) -> dict[str, str]:
        head = lines[start].split("#", 1)[0].strip()
        inline = head.removeprefix("permissions:").strip()
        if inline:
            return {"*": inline} if inline != "{}" else {}
        out: dict[str, str] = {}
        for line in lines[start + 1 :]:
            text = line.split("#", 1)[0].rstrip()
            if not text.strip():
                continue
            if len(text) - len(text.lstrip()) <= indent:
                break
            scope, _, level = text.strip().partition(":")
            out[scope.strip()] = level.strip()
        return out

    top: dict[str, str] | None = None
    jobs: dict[str, dict[str, str]] = {}
    job: str | None = None
    in_jobs = False
    for n, line in enumerate(lines):
        text = line.split("#", 1)[0].rstrip()
        if not text.strip():
            continue
        indent = len(text) - len(text.lstrip())
        if indent == 0:
            in_jobs = text == "jobs:"
            job = None
            if text.startswith("permissions:"):
                top = block(n, 0)
        elif in_jobs and indent == 2 and text.endswith(":"):
            job = text.strip().removesuffix(":")
            jobs[job] = {}
        elif job is not None and indent == 4 and text.strip().startswith("permissions:"):
            jobs[job] = block(n, 4)
    return top, jobs


def test_release_workflow_grants_packages_write_to_the_publish_job_only() -> None:
    top, jobs = job_permissions(ROOT / ".github" / "workflows" / "release.yml")
    assert top == {}, "release.yml must grant nothing by default"
    assert "publish" in jobs, sorted(jobs)
    assert jobs["publish"] == {"contents": "write", "packages": "write"}
    for name, perms in jobs.items():
        if name != "publish":
            assert set(perms.values()) <= {"read", "none"}, (name, perms)
    text = (ROOT / ".github" / "workflows" / "release.yml").read_text()
    publish_job = text.split("\n  publish:\n", 1)[1]
    # The push goes to ghcr.io with the workflow's own token, not a personal one.
    assert re.search(r"--to ghcr\.io/\S+", publish_job)
    assert "${{ secrets.GITHUB_TOKEN }}" in publish_job and "--password-stdin" in publish_job
    assert "gh release upload" in publish_job and "out/release" in publish_job


def test_ci_workflow_only_reads() -> None:
    top, jobs = job_permissions(ROOT / ".github" / "workflows" / "ci.yml")
    assert top == {"contents": "read"}
    assert jobs, "no job found: the reader is broken"
    for name, perms in jobs.items():
        assert set(perms.values()) <= {"read", "none"}, (name, perms)


def test_the_permission_reader_sees_a_broad_grant(tmp_path: Path) -> None:
    """The reader above must be able to fail: a write-all job is reported as such."""
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "name: x\non: push\npermissions: write-all\njobs:\n  a:\n    runs-on: x\n"
        "    permissions:\n      contents: write # why\n      id-token: write\n"
        "    steps:\n      - run: echo\n  b:\n    permissions: read-all\n"
    )
    top, jobs = job_permissions(bad)
    assert top == {"*": "write-all"}
    assert jobs == {"a": {"contents": "write", "id-token": "write"}, "b": {"*": "read-all"}}
    assert json.dumps(jobs)  # plain data
