"""Issue #3 end to end: the seed-compatible API against real registries (plain, bearer
token with anonymous pull, htpasswd via docker config.json, TLS with a private CA),
with releases made by the publisher.

Configured as the scheduler is: environment variables, then `configure()`. Network
traffic is counted on a FaultProxy in front of the registry; tampering is done in the
registry's own storage or by pushing other documents under the release's tags.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

import exec_sandbox_assets as esa
from conftest import HTPASSWD_USERS, TOKEN_USERS, FaultProxyFactory
from exec_sandbox_assets import client as fetch_module
from exec_sandbox_assets.base.errors import (
    AllSourcesFailedError,
    AssetChecksumError,
    NoTrustedKeysError,
    RollbackError,
    SignatureError,
    VersionMismatchError,
)
from exec_sandbox_assets.oci.model import MEDIA_TYPE_INDEX, MEDIA_TYPE_MANIFEST, sha256_digest
from exec_sandbox_assets.release import catalog
from releases import (
    SampleRelease,
    flip_stored_blob,
    make_key_pair,
    publish_sample_release,
    push_signature,
    put_manifest,
    read_manifest,
    resign,
    stored_blob_path,
)
from servers import FaultProxy, RegistryServer, RequestRecord

VERSION = "1.0.0"
MiB = 1024 * 1024
HOST_ARCH = catalog.host_arch()
HOST_OS, HOST_GOARCH = catalog.host_platform()
OTHER_ARCH = "aarch64" if HOST_ARCH == "x86_64" else "x86_64"
KERNEL = f"vmlinuz-{HOST_ARCH}"
INITRAMFS = f"initramfs-{HOST_ARCH}"
PYTHON = f"python-3.14-base-{HOST_ARCH}.qcow2"
GVPROXY = f"gvproxy-wrapper-{HOST_OS}-{HOST_GOARCH}"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def fresh_singleton(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test builds its own process-wide client (configure()), and leaves none behind."""
    monkeypatch.setattr(esa, "_assets_singleton", None)


@pytest.fixture(autouse=True)
def docker_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty DOCKER_CONFIG dir: no credentials of the machine leak in."""
    path = tmp_path / "docker-config"
    path.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(path))
    return path


@pytest.fixture
def release(registry: RegistryServer, repo_name: str, tmp_path: Path) -> SampleRelease:
    """Release 1.0.0 of the sample build, published to the plain registry."""
    return publish_sample_release(registry.ref(repo_name), VERSION, tmp_path / "work")


def use(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    source: str,
    key: Path | None,
    *,
    version: str | None = VERSION,
    configure: dict[str, Any] | None = None,
    **env: str,
) -> Path:
    """Configure the process-wide client the way a deployment does: EXEC_SANDBOX_*
    variables, then `configure()`. Returns the cache dir."""
    cache = tmp_path / "cache"
    values = {
        "EXEC_SANDBOX_CACHE_DIR": str(cache),
        "EXEC_SANDBOX_REGISTRY": source,
        "EXEC_SANDBOX_AIRGAP": "1",  # never the public defaults (ghcr.io, GitHub)
    }
    if version is not None:
        values["EXEC_SANDBOX_ASSET_VERSION"] = version
    if key is not None:
        values["EXEC_SANDBOX_TRUSTED_KEYS"] = str(key)
    values.update(env)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    reconfigure(tmp_path, **(configure or {}))
    return cache


def reconfigure(tmp_path: Path, **explicit: Any) -> None:
    """`configure()` again (re-reads the environment), as a freshly started process would.
    The checkout's images/dist must not count, so the local build dir points nowhere."""
    esa.configure(local_build_dir=tmp_path / "no-local-build", **explicit)


def assert_exact(release: SampleRelease, *paths: Path) -> None:
    for path in paths:
        assert path.read_bytes() == release.expected(path.name), f"{path} differs"


def installed(cache: Path) -> list[Path]:
    """Files under a final name in the cache's version dirs, and their verification records."""
    found: list[Path] = []
    for vdir in cache.glob("v*"):
        found += [p for p in vdir.iterdir() if p.is_file() and not p.name.startswith(".")]
        found += list((vdir / ".verified").glob("*.json"))
    return found


def blob_gets(proxy: FaultProxy, digest: str) -> list[RequestRecord]:
    return [r for r in proxy.requests if r.method == "GET" and r.path.endswith(f"/blobs/{digest}")]


def range_offset(record: RequestRecord) -> int:
    value = record.headers["range"]
    assert value.startswith("bytes=") and value.endswith("-"), value
    return int(value.removeprefix("bytes=").removesuffix("-"))


def run_python(code: str, *args: str, timeout: float = 60) -> str:
    """Run `code` in a fresh interpreter with this process's environment."""
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# --------------------------------------------------------------------------- cold / warm


async def test_cold_fetch_is_exact_and_warm_calls_make_no_request(
    registry: RegistryServer,
    release: SampleRelease,
    fault_proxy: FaultProxyFactory,
    repo_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxy = fault_proxy(registry)
    cache = use(monkeypatch, tmp_path, proxy.ref(repo_name), release.key.public)

    kernel = await esa.fetch_kernel()
    base = await esa.fetch_base_image("python")
    images_dir, gvproxy = await esa.ensure_assets_available("python")

    assert images_dir == cache / f"v{VERSION}"
    assert (kernel, base, gvproxy) == (
        images_dir / KERNEL,
        images_dir / PYTHON,
        images_dir / GVPROXY,
    )
    assert_exact(release, kernel, base, images_dir / INITRAMFS, gvproxy)
    assert os.access(gvproxy, os.X_OK)
    assert proxy.requests, "the cold calls went through the proxy"
    for name in (KERNEL, INITRAMFS, PYTHON, GVPROXY):
        assert len(blob_gets(proxy, release.layer(name).digest)) == 1, name

    async def warm_calls() -> None:
        assert await esa.fetch_kernel() == kernel
        assert await esa.fetch_initramfs() == images_dir / INITRAMFS
        assert await esa.fetch_base_image("python") == base
        assert await esa.fetch_gvproxy() == gvproxy
        assert await esa.get_gvproxy_path() == gvproxy
        assert await esa.ensure_assets_available("python") == (images_dir, gvproxy)
        assert await esa.ensure_assets(download=True, language="python") == images_dir
        assert await esa.ensure_assets() == images_dir

    proxy.reset()
    await warm_calls()
    reconfigure(tmp_path)  # a new client, as a restarted scheduler builds
    await warm_calls()
    assert proxy.requests == []

    registry.stop()
    reconfigure(tmp_path)
    await warm_calls()
    assert proxy.requests == []
    assert_exact(release, kernel, base, images_dir / INITRAMFS, gvproxy)


async def test_token_registry_anonymous_pull(
    token_registry: RegistryServer, repo_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ghcr.io-like: the publisher logs in, the client pulls with an anonymous token."""
    ((user, password),) = TOKEN_USERS.items()
    rel = publish_sample_release(
        token_registry.ref(repo_name), VERSION, tmp_path / "work", username=user, password=password
    )
    tokens = token_registry.token_server
    assert tokens is not None
    published = len(tokens.requests)
    use(monkeypatch, tmp_path, token_registry.ref(repo_name), rel.key.public)

    images_dir, gvproxy = await esa.ensure_assets_available("python")

    assert_exact(rel, *(images_dir / n for n in (KERNEL, INITRAMFS, PYTHON)), gvproxy)
    ours = tokens.requests[published:]
    assert ours, "the client asked the token endpoint"
    for request in ours:
        assert (request.status, request.authorization) == (200, False)
        assert request.granted == [{"type": "repository", "name": repo_name, "actions": ["pull"]}]


async def test_htpasswd_registry_credentials_from_docker_config(
    htpasswd_registry: RegistryServer,
    docker_config: Path,
    repo_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ((user, password),) = HTPASSWD_USERS.items()
    rel = publish_sample_release(
        htpasswd_registry.ref(repo_name),
        VERSION,
        tmp_path / "work",
        username=user,
        password=password,
    )
    use(monkeypatch, tmp_path, htpasswd_registry.ref(repo_name), rel.key.public)

    with pytest.raises(AllSourcesFailedError) as info:
        await esa.fetch_kernel()
    assert "401" in str(info.value)
    assert f"no credentials configured for {htpasswd_registry.host}" in str(info.value)

    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (docker_config / "config.json").write_text(
        json.dumps({"auths": {htpasswd_registry.host: {"auth": auth}}})
    )
    reconfigure(tmp_path)
    images_dir, gvproxy = await esa.ensure_assets_available("python")
    assert_exact(rel, *(images_dir / n for n in (KERNEL, INITRAMFS, PYTHON)), gvproxy)


async def test_tls_registry_with_private_ca(
    tls_registry: RegistryServer, repo_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rel = publish_sample_release(
        tls_registry.ref(repo_name), VERSION, tmp_path / "work", ca_bundle=tls_registry.ca_bundle
    )
    assert tls_registry.ref(repo_name).startswith("https://")
    use(monkeypatch, tmp_path, tls_registry.ref(repo_name), rel.key.public)

    with pytest.raises(AllSourcesFailedError, match="not trusted"):
        await esa.fetch_kernel()

    monkeypatch.setenv("EXEC_SANDBOX_CA_BUNDLE", str(tls_registry.ca_bundle))
    reconfigure(tmp_path)
    images_dir, gvproxy = await esa.ensure_assets_available("python")
    assert_exact(rel, *(images_dir / n for n in (KERNEL, INITRAMFS, PYTHON)), gvproxy)


# --------------------------------------------------------------------------- tampering


async def test_changed_blob_is_refused(
    registry: RegistryServer,
    release: SampleRelease,
    repo_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    layer = release.layer(KERNEL)
    flip_stored_blob(registry.data_dir, layer.digest)
    cache = use(monkeypatch, tmp_path, registry.ref(repo_name), release.key.public)

    with pytest.raises(AssetChecksumError) as info:
        await esa.fetch_kernel()

    assert f"blob {layer.digest}" in str(info.value)
    assert installed(cache) == []
    assert list(cache.glob("blobs/*/*")) == [], "neither a blob nor a partial is kept"


async def test_changed_manifest_is_refused(
    registry: RegistryServer,
    release: SampleRelease,
    repo_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The platform manifest now points the kernel at the initramfs's content."""
    digest = release.result.manifest_digests[(HOST_OS, HOST_GOARCH)]
    path = stored_blob_path(registry.data_dir, digest)
    stored = path.read_bytes()
    kernel, initramfs = release.layer(KERNEL), release.layer(INITRAMFS)
    changed = stored.replace(kernel.content_digest.encode(), initramfs.content_digest.encode())
    assert changed != stored and len(changed) == len(stored)
    path.write_bytes(changed)
    cache = use(monkeypatch, tmp_path, registry.ref(repo_name), release.key.public)

    with pytest.raises(AssetChecksumError) as info:
        await esa.ensure_assets_available("python")

    assert f"manifest {digest}" in str(info.value)
    assert installed(cache) == []


@pytest.mark.parametrize("copy_signature", [False, True], ids=["unsigned", "old-signature"])
async def test_changed_index_is_refused(
    registry: RegistryServer,
    release: SampleRelease,
    repo_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    copy_signature: bool,
) -> None:
    """Different index bytes pushed under the tag (one platform dropped); with
    `copy_signature` the genuine signature is also stored under the new digest's tag."""
    work = tmp_path / "work"
    doc = json.loads(read_manifest(release.target, work, release.tag))
    doc["manifests"] = doc["manifests"][:1]
    changed = json.dumps(doc).encode()
    changed_digest = sha256_digest(changed)
    put_manifest(release.target, work, changed, MEDIA_TYPE_INDEX, release.tag)
    if copy_signature:
        genuine = read_manifest(release.target, work, release.signature_tag)
        sig_tag = "sha256-" + changed_digest.partition(":")[2] + ".sig"
        put_manifest(release.target, work, genuine, MEDIA_TYPE_MANIFEST, sig_tag)
    cache = use(monkeypatch, tmp_path, registry.ref(repo_name), release.key.public)

    with pytest.raises(SignatureError) as info:
        await esa.ensure_assets_available("python")

    message = str(info.value)
    assert changed_digest in message
    if copy_signature:
        assert "1 valid signature(s) were for another digest" in message
    else:
        assert f"no signature for index {changed_digest}" in message
    assert installed(cache) == []


async def test_changed_signature_payload_is_refused(
    registry: RegistryServer,
    release: SampleRelease,
    repo_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    signature = json.loads(read_manifest(release.target, tmp_path / "work", release.signature_tag))
    payload_digest = signature["layers"][0]["digest"]
    flip_stored_blob(registry.data_dir, payload_digest, offset=20)
    cache = use(monkeypatch, tmp_path, registry.ref(repo_name), release.key.public)

    with pytest.raises(AssetChecksumError) as info:
        await esa.fetch_kernel()

    assert "signature payload 0" in str(info.value)
    assert payload_digest in str(info.value)
    assert installed(cache) == []


async def test_signature_replaced_by_another_keys_is_refused(
    registry: RegistryServer,
    release: SampleRelease,
    repo_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A well-formed signature over the right digest and version, by a key not trusted."""
    other = make_key_pair(tmp_path / "other-keys", "other")
    forged = resign(release.index_digest, other, VERSION, release.created)
    push_signature(release.target, tmp_path / "work", release.index_digest, forged)
    cache = use(monkeypatch, tmp_path, registry.ref(repo_name), release.key.public)

    with pytest.raises(SignatureError) as info:
        await esa.fetch_kernel()

    message = str(info.value)
    assert release.index_digest in message
    # The default trusted workflow counts too: no Sigstore bundle here.
    assert "valid signatures from 0 trusted key(s) and 0 trusted workflow(s), 1 required" in message
    assert installed(cache) == []


async def test_signature_by_an_untrusted_key_is_refused(
    registry: RegistryServer,
    release: SampleRelease,
    repo_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    other = make_key_pair(tmp_path / "other-keys", "other")
    cache = use(monkeypatch, tmp_path, registry.ref(repo_name), other.public)

    with pytest.raises(SignatureError) as info:
        await esa.ensure_assets_available("python")

    message = str(info.value)
    assert "valid signatures from 0 trusted key(s)" in message
    assert "trusted keys tried" in message
    assert installed(cache) == []


async def test_other_release_served_under_the_asked_tag_is_refused(
    registry: RegistryServer,
    release: SampleRelease,
    repo_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Mix-and-match: release 2.0.0's validly signed index, served as v1.0.0."""
    work = tmp_path / "work"
    v2 = publish_sample_release(release.target, "2.0.0", work, key=release.key)
    put_manifest(
        release.target, work, read_manifest(v2.target, work, v2.tag), MEDIA_TYPE_INDEX, release.tag
    )
    cache = use(monkeypatch, tmp_path, registry.ref(repo_name), release.key.public)

    with pytest.raises(VersionMismatchError) as info:
        await esa.fetch_kernel()

    message = str(info.value)
    assert v2.index_digest in message
    assert "signed as version '2.0.0'" in message
    assert "version '1.0.0' was asked for" in message
    assert installed(cache) == []


# --------------------------------------------------------------------------- resume


class ProgressRecorder:
    """A `fetch.Progress` that records, per file, start/finish and the bytes advanced."""

    def __init__(self) -> None:
        self.events: dict[str, list[tuple[str, int]]] = {}

    def start(self, name: str, total: int) -> None:
        self.events.setdefault(name, []).append(("start", total))

    def advance(self, name: str, nbytes: int) -> None:
        assert nbytes > 0
        events = self.events[name]
        if events[-1][0] == "done":
            events[-1] = ("done", events[-1][1] + nbytes)
        else:
            events.append(("done", nbytes))

    def finish(self, name: str) -> None:
        self.events[name].append(("finish", 0))


def _cut_release(registry: RegistryServer, repo_name: str, tmp_path: Path) -> SampleRelease:
    # Over 1 MiB of blob, so the SIGKILL test sees a partial before the body is complete.
    return publish_sample_release(
        registry.ref(repo_name), VERSION, tmp_path / "work", sizes={PYTHON: 10 * MiB}
    )


async def test_cut_download_resumes_from_the_same_source(
    registry: RegistryServer,
    fault_proxy: FaultProxyFactory,
    repo_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rel = _cut_release(registry, repo_name, tmp_path)
    proxy = fault_proxy(registry)
    use(monkeypatch, tmp_path, proxy.ref(repo_name), rel.key.public)
    await esa.ensure_registry_loaded()  # index, signature and manifest: not counted below
    blob = rel.layer(PYTHON)
    half = blob.size // 2
    proxy.reset()
    proxy.match_path = blob.digest
    proxy.cut_after_bytes = half
    proxy.cut_times = 1
    progress = ProgressRecorder()

    spec = catalog.base_image("python", HOST_ARCH)
    path = (await esa.get_assets().fetch([spec], progress=progress))[PYTHON]

    assert_exact(rel, path)
    first, second = blob_gets(proxy, blob.digest)
    assert "range" not in first.headers
    assert half - 64 * 1024 <= range_offset(second) <= half
    # What crossed the wire for this blob: one blob (plus two response heads), not 1.5.
    assert blob.size <= proxy.bytes_to_client <= blob.size + 4096
    # The resumed attempt reports its start offset again: progress counts it once.
    assert progress.events[PYTHON] == [("start", blob.size), ("done", blob.size), ("finish", 0)]


async def test_cut_download_resumes_on_the_next_call(
    registry: RegistryServer,
    fault_proxy: FaultProxyFactory,
    repo_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no resume left in the call, the partial is kept and the next call finishes it."""
    monkeypatch.setattr(fetch_module, "MAX_RESUMES", 0)
    rel = _cut_release(registry, repo_name, tmp_path)
    proxy = fault_proxy(registry)
    cache = use(monkeypatch, tmp_path, proxy.ref(repo_name), rel.key.public)
    await esa.ensure_registry_loaded()
    blob = rel.layer(PYTHON)
    half = blob.size // 2
    proxy.reset()
    proxy.match_path = blob.digest
    proxy.cut_after_bytes = half

    with pytest.raises(AllSourcesFailedError) as info:
        await esa.fetch_base_image("python")
    assert "body broke off" in str(info.value)
    assert installed(cache) == []
    [(_, kept)] = esa.get_assets().store.partials()
    assert half - 64 * 1024 <= kept <= half

    proxy.cut_after_bytes = None
    path = await esa.fetch_base_image("python")

    assert_exact(rel, path)
    first, second = blob_gets(proxy, blob.digest)
    assert "range" not in first.headers
    assert range_offset(second) == kept
    assert blob.size <= proxy.bytes_to_client <= blob.size + 4096
    assert esa.get_assets().store.partials() == []


_PULL_PYTHON = """
import asyncio, sys
from pathlib import Path
import exec_sandbox_assets as esa
esa.configure(local_build_dir=Path(sys.argv[1]))
print(asyncio.run(esa.fetch_base_image("python")))
"""


async def test_killed_download_is_resumed_by_the_next_run(
    registry: RegistryServer,
    fault_proxy: FaultProxyFactory,
    repo_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rel = _cut_release(registry, repo_name, tmp_path)
    blob = rel.layer(PYTHON)
    assert blob.size > 2 * MiB, "the client writes in 1 MiB pieces: leave room to see one"
    proxy = fault_proxy(registry)
    proxy.match_path = blob.digest
    proxy.throttle_bytes_per_s = 2 * MiB
    cache = use(monkeypatch, tmp_path, proxy.ref(repo_name), rel.key.public)
    partial = cache / "blobs" / "sha256" / (blob.digest.partition(":")[2] + ".partial")

    proc = subprocess.Popen(
        [sys.executable, "-c", _PULL_PYTHON, str(tmp_path / "no-local-build")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not (partial.exists() and partial.stat().st_size > 0):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no partial appeared"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    left = partial.stat().st_size
    assert 0 < left < blob.size
    assert installed(cache) == []

    proxy.throttle_bytes_per_s = None
    path = await esa.fetch_base_image("python")

    assert_exact(rel, path)
    killed, resumed = blob_gets(proxy, blob.digest)
    assert "range" not in killed.headers
    assert range_offset(resumed) == left
    assert not partial.exists()


# --------------------------------------------------------------------------- concurrency


_ENSURE_PYTHON = """
import asyncio, json, sys, time
from pathlib import Path
import exec_sandbox_assets as esa
esa.configure(local_build_dir=Path(sys.argv[1]))
Path(sys.argv[2]).touch()
go = Path(sys.argv[3])
while not go.exists():
    time.sleep(0.002)
images_dir, gvproxy = asyncio.run(esa.ensure_assets_available("python"))
print(json.dumps([str(images_dir), str(gvproxy)]))
"""


async def test_eight_processes_download_each_blob_once(
    registry: RegistryServer,
    release: SampleRelease,
    fault_proxy: FaultProxyFactory,
    repo_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxy = fault_proxy(registry)
    proxy.match_path = "/blobs/"
    proxy.stall_seconds = 0.3  # every blob response starts late: the processes overlap
    use(monkeypatch, tmp_path, proxy.ref(repo_name), release.key.public)
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{n}" for n in range(8)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _ENSURE_PYTHON,
                str(tmp_path / "no-local-build"),
                str(r),
                str(go),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in ready
    ]
    try:
        deadline = time.monotonic() + 60
        while not all(r.exists() for r in ready):
            assert all(p.poll() is None for p in procs), "a process died while starting"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        go.touch()
        outputs = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
    results = {out for out, _ in outputs}
    assert len(results) == 1, results
    images_dir, gvproxy = (Path(p) for p in json.loads(results.pop()))
    assert_exact(release, *(images_dir / n for n in (KERNEL, INITRAMFS, PYTHON)), gvproxy)
    # All eight started cold (each resolved the release), so the locks did the sharing.
    tag_gets = [r for r in proxy.requests if r.path.endswith(f"/manifests/{release.tag}")]
    assert len(tag_gets) == 8
    for name in (KERNEL, INITRAMFS, PYTHON, GVPROXY):
        gets = blob_gets(proxy, release.layer(name).digest)
        full = [r for r in gets if "range" not in r.headers]
        assert len(full) == 1, f"{name}: {len(full)} full downloads"
        assert gets == full, f"{name}: unexpected range requests"


# --------------------------------------------------------------------------- offline


async def test_offline_with_an_empty_cache_names_every_place_searched(
    registry: RegistryServer,
    release: SampleRelease,
    fault_proxy: FaultProxyFactory,
    repo_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxy = fault_proxy(registry)
    images = tmp_path / "operator-images"
    images.mkdir()
    cache = use(
        monkeypatch,
        tmp_path,
        proxy.ref(repo_name),
        release.key.public,
        EXEC_SANDBOX_OFFLINE="1",
        EXEC_SANDBOX_IMAGES_DIR=str(images),
    )
    assert esa.is_offline_mode()

    # Coroutines made one at a time: a failure leaves none un-awaited behind it.
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: esa.fetch_kernel(),
        lambda: esa.ensure_assets_available("python"),
        lambda: esa.ensure_assets(download=True, language="python"),
    ]
    for call in calls:
        with pytest.raises(FileNotFoundError) as info:
            await call()
        message = str(info.value)
        for place in (images, tmp_path / "no-local-build", cache / f"v{VERSION}"):
            assert str(place) in message, (place, message)
        assert "offline" in message
    await esa.ensure_registry_loaded()  # a no-op offline
    assert proxy.requests == []


async def test_offline_with_a_warm_cache_works_with_the_registry_stopped(
    registry: RegistryServer,
    release: SampleRelease,
    repo_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use(monkeypatch, tmp_path, registry.ref(repo_name), release.key.public)
    images_dir, gvproxy = await esa.ensure_assets_available("python")
    registry.stop()

    monkeypatch.setenv("EXEC_SANDBOX_OFFLINE", "1")
    reconfigure(tmp_path)
    assert esa.is_offline_mode()
    assert await esa.ensure_assets_available("python") == (images_dir, gvproxy)
    assert await esa.ensure_assets(language="python") == images_dir
    assert await esa.fetch_kernel() == images_dir / KERNEL
    assert_exact(release, images_dir / KERNEL, images_dir / PYTHON, gvproxy)


async def test_offline_reads_a_local_oci_layout_mirror(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An air-gapped copy on disk counts as a source even offline (SPEC section 7)."""
    layout = tmp_path / "layout"
    rel = publish_sample_release(f"oci:{layout}", VERSION, tmp_path / "work")
    use(
        monkeypatch,
        tmp_path,
        "http://127.0.0.1:9/unreachable",  # never contacted: offline drops registries
        rel.key.public,
        EXEC_SANDBOX_OFFLINE="1",
        EXEC_SANDBOX_REGISTRY_MIRRORS=f"oci:{layout}",
    )

    images_dir, gvproxy = await esa.ensure_assets_available("python")

    assert_exact(rel, *(images_dir / n for n in (KERNEL, INITRAMFS, PYTHON)), gvproxy)


async def test_a_dead_mirror_falls_back_and_every_failure_is_listed(
    registry: RegistryServer,
    release: SampleRelease,
    repo_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dead = RegistryServer(tmp_path / "dead-mirror")
    dead.start()
    dead.stop()  # a port that refuses connections
    mirror = dead.ref(repo_name)
    use(
        monkeypatch,
        tmp_path,
        registry.ref(repo_name),
        release.key.public,
        EXEC_SANDBOX_REGISTRY_MIRRORS=mirror,
    )

    images_dir, gvproxy = await esa.ensure_assets_available("python")
    assert_exact(release, *(images_dir / n for n in (KERNEL, INITRAMFS, PYTHON)), gvproxy)

    registry.stop()
    reconfigure(tmp_path)
    with pytest.raises(AllSourcesFailedError) as info:
        await esa.fetch_base_image("javascript")
    message = str(info.value)
    assert f"registry {mirror}" in message and f"registry {registry.ref(repo_name)}" in message
    assert message.count("unreachable") == 2


# --------------------------------------------------------------------------- trust settings


async def test_no_trusted_key_is_refused_with_how_to_configure_one(
    registry: RegistryServer,
    release: SampleRelease,
    repo_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Explicitly none: keys shipped in the package, if any, and the default trusted
    # release workflow must not make this pass.
    cache = use(
        monkeypatch,
        tmp_path,
        registry.ref(repo_name),
        None,
        configure={"trusted_keys": (), "trusted_workflows": ()},
    )

    with pytest.raises(NoTrustedKeysError) as info:
        await esa.fetch_kernel()

    message = str(info.value)
    assert "no trusted key is configured" in message
    assert "EXEC_SANDBOX_TRUSTED_KEYS" in message
    assert installed(cache) == []


async def test_insecure_skip_verify_works_and_warns(
    registry: RegistryServer,
    release: SampleRelease,
    repo_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="exec_sandbox_assets")
    use(
        monkeypatch,
        tmp_path,
        registry.ref(repo_name),
        None,
        configure={"trusted_keys": ()},
        EXEC_SANDBOX_INSECURE_SKIP_VERIFY="1",
    )

    kernel = await esa.fetch_kernel()

    assert_exact(release, kernel)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("SIGNATURE VERIFICATION DISABLED" in r.getMessage() for r in warnings)


# --------------------------------------------------------------------------- seed fixes


async def test_ensure_assets_checks_every_file_not_only_the_kernel(
    registry: RegistryServer,
    release: SampleRelease,
    fault_proxy: FaultProxyFactory,
    repo_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxy = fault_proxy(registry)
    only_kernel = tmp_path / "only-kernel"
    only_kernel.mkdir()
    (only_kernel / KERNEL).write_bytes(release.expected(KERNEL))
    cache = use(monkeypatch, tmp_path, proxy.ref(repo_name), release.key.public)

    # An explicit override must hold every VM file; what it lacks is reported, not fetched.
    with pytest.raises(FileNotFoundError) as info:
        await esa.ensure_assets(override=only_kernel, download=True)
    assert str(only_kernel) in str(info.value)
    assert f"{INITRAMFS} not found" in str(info.value)
    vm_only = tmp_path / "vm-only"
    vm_only.mkdir()
    for name in (KERNEL, INITRAMFS):
        (vm_only / name).write_bytes(release.expected(name))
    with pytest.raises(FileNotFoundError) as info:
        await esa.ensure_assets(override=vm_only)
    assert f"{GVPROXY} not found" in str(info.value)
    with pytest.raises(FileNotFoundError, match=INITRAMFS):
        await esa.ensure_assets_available(override=only_kernel)
    with pytest.raises(FileNotFoundError, match=PYTHON):
        await esa.fetch_base_image("python", override=only_kernel)
    assert await esa.fetch_kernel(override=only_kernel) == only_kernel / KERNEL
    assert proxy.requests == []

    # The same directory as EXEC_SANDBOX_IMAGES_DIR: incomplete, so not the answer.
    monkeypatch.setenv("EXEC_SANDBOX_IMAGES_DIR", str(only_kernel))
    reconfigure(tmp_path)
    with pytest.raises(FileNotFoundError, match="auto_download_assets=False"):
        await esa.ensure_assets()
    images_dir = await esa.ensure_assets(download=True)
    assert images_dir == cache / f"v{VERSION}"
    assert_exact(release, *(images_dir / n for n in (KERNEL, INITRAMFS, GVPROXY)))

    # gvproxy is a host binary, not an image: an override without it still works, the
    # binary comes from the verified cache (or is fetched with download=True).
    proxy.reset()
    assert await esa.ensure_assets(override=vm_only) == vm_only
    assert await esa.ensure_assets_available(override=vm_only) == (vm_only, images_dir / GVPROXY)

    # A complete override is used as it is, without a request.
    assert await esa.ensure_assets(override=images_dir) == images_dir
    assert await esa.ensure_assets_available(override=images_dir) == (
        images_dir,
        images_dir / GVPROXY,
    )
    assert proxy.requests == []


async def test_prefetch_all_assets_for_the_other_arch(
    registry: RegistryServer,
    release: SampleRelease,
    repo_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = use(monkeypatch, tmp_path, registry.ref(repo_name), release.key.public)

    result = await esa.prefetch_all_assets(OTHER_ARCH)

    assert result.success, result.errors
    assert result.arch == OTHER_ARCH
    expected_labels = ["kernel", "initramfs", "gvproxy", "python base", "javascript base"]
    assert sorted(result.downloaded) == sorted([*expected_labels, "raw base"])
    assert result.cache_dir == cache / f"v{VERSION}"
    names = [
        f"vmlinuz-{OTHER_ARCH}",
        f"initramfs-{OTHER_ARCH}",
        f"python-3.14-base-{OTHER_ARCH}.qcow2",
        f"node-1.3-base-{OTHER_ARCH}.qcow2",
        f"raw-base-{OTHER_ARCH}.qcow2",
        GVPROXY,  # the host's, not the other arch's
    ]
    assert_exact(release, *(result.cache_dir / n for n in names))
    other_goarch = catalog.GOARCH[OTHER_ARCH]
    assert not (result.cache_dir / f"gvproxy-wrapper-{HOST_OS}-{other_goarch}").exists()
    assert not (result.cache_dir / KERNEL).exists()


async def test_latest_follows_releases_and_refuses_a_rollback(
    registry: RegistryServer,
    repo_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    work = tmp_path / "work"
    target = registry.ref(repo_name)
    v1 = publish_sample_release(
        target, "1.0.0", work, created="2026-01-01T00:00:00Z", tag_latest=True
    )
    cache = use(monkeypatch, tmp_path, target, v1.key.public, version=None)
    assert esa.get_assets().settings.tag == "latest"

    kernel = await esa.fetch_kernel()
    assert kernel == cache / "v1.0.0" / KERNEL
    assert_exact(v1, kernel)

    v2 = publish_sample_release(
        target, "2.0.0", work, key=v1.key, created="2026-02-01T00:00:00Z", tag_latest=True
    )
    reconfigure(tmp_path)
    node = await esa.fetch_base_image("javascript")
    assert node.parent == cache / "v2.0.0"
    assert_exact(v2, node)
    assert (await esa.fetch_kernel()).parent == cache / "v2.0.0"

    # Someone points latest back at the older, validly signed release.
    put_manifest(target, work, read_manifest(target, work, v1.tag), MEDIA_TYPE_INDEX, "latest")
    reconfigure(tmp_path)
    with pytest.raises(RollbackError) as info:
        await esa.fetch_base_image("raw")
    message = str(info.value)
    assert v1.index_digest in message
    assert "2026-01-01T00:00:00Z" in message and "2026-02-01T00:00:00Z" in message
    assert "EXEC_SANDBOX_ALLOW_DOWNGRADE=1" in message
    assert not list(cache.glob(f"v*/raw-base-{HOST_ARCH}.qcow2"))

    monkeypatch.setenv("EXEC_SANDBOX_ALLOW_DOWNGRADE", "1")
    reconfigure(tmp_path)
    raw = await esa.fetch_base_image("raw")
    assert raw.parent == cache / "v1.0.0"
    assert_exact(v1, raw)


async def test_an_outage_of_the_mirror_does_not_roll_latest_back_to_the_default(
    registry: RegistryServer,
    repo_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue #12 item 6: rollback state is per tag across sources, not per source."""
    mirror_registry = RegistryServer(tmp_path / "mirror-registry")
    mirror_registry.start()
    try:
        work = tmp_path / "work"
        default, mirror = registry.ref(repo_name), mirror_registry.ref(repo_name)
        old = publish_sample_release(
            default, "1.0.0", work, created="2026-01-01T00:00:00Z", tag_latest=True
        )
        new = publish_sample_release(
            mirror,
            "2.0.0",
            work,
            key=old.key,
            created="2026-02-01T00:00:00Z",
            tag_latest=True,
        )
        cache = use(
            monkeypatch,
            tmp_path,
            default,
            old.key.public,
            version=None,
            EXEC_SANDBOX_REGISTRY_MIRRORS=mirror,
        )
        assert (await esa.fetch_kernel()).parent == cache / "v2.0.0"
        assert_exact(new, cache / "v2.0.0" / KERNEL)

        mirror_registry.stop()
        reconfigure(tmp_path)
        with pytest.raises(RollbackError) as info:
            await esa.fetch_initramfs()
        assert old.index_digest in str(info.value)
        assert esa.get_assets().cached_version() == "2.0.0"  # the cache's latest stays
        assert not (cache / "v1.0.0").exists()
    finally:
        mirror_registry.close()


# --------------------------------------------------------------------------- imports

_NOT_ON_THE_IMPORT_PATH = (
    "oras",
    "requests",
    "rich",
    "exec_sandbox_assets.publish",
    "exec_sandbox_assets.cli",
    "sigstore",
)
_NOT_ON_THE_WARM_PATH = (*_NOT_ON_THE_IMPORT_PATH, "httpx", "cryptography", "zstandard")


def _loaded(modules: Sequence[str], banned: Sequence[str]) -> list[str]:
    return sorted(m for m in modules if any(m == b or m.startswith(b + ".") for b in banned))


def test_the_scheduler_import_path_is_lean() -> None:
    out = run_python(
        "import exec_sandbox_assets, json, sys; print(json.dumps(sorted(sys.modules)))"
    )
    modules = json.loads(out)
    assert "exec_sandbox_assets" in modules
    assert _loaded(modules, _NOT_ON_THE_IMPORT_PATH) == []


_WARM_CALLS = """
import asyncio, json, sys
from pathlib import Path
import exec_sandbox_assets as esa

async def main():
    esa.configure(local_build_dir=Path(sys.argv[1]))
    images_dir, gvproxy = await esa.ensure_assets_available("python")
    assert await esa.ensure_assets(download=True, language="python") == images_dir
    assert (await esa.fetch_kernel()).parent == images_dir
    assert (await esa.fetch_initramfs()).parent == images_dir
    assert (await esa.fetch_base_image("python")).parent == images_dir
    assert await esa.fetch_gvproxy() == gvproxy
    assert await esa.get_gvproxy_path() == gvproxy

asyncio.run(main())
print(json.dumps(sorted(sys.modules)))
"""


async def test_the_warm_path_imports_no_network_or_crypto_stack(
    registry: RegistryServer,
    release: SampleRelease,
    repo_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use(monkeypatch, tmp_path, registry.ref(repo_name), release.key.public)
    await esa.ensure_assets_available("python")
    registry.stop()

    out = await asyncio.to_thread(run_python, _WARM_CALLS, str(tmp_path / "no-local-build"))

    assert _loaded(json.loads(out), _NOT_ON_THE_WARM_PATH) == []


# --------------------------------------------------------------------------- signed chunks


def _chunked_release(registry: RegistryServer, repo_name: str, tmp_path: Path) -> SampleRelease:
    # A python image of several 4 MiB chunks once compressed (the samples compress ~4:1).
    return publish_sample_release(
        registry.ref(repo_name), VERSION, tmp_path / "work", sizes={PYTHON: 40 * MiB}
    )


async def test_large_layers_carry_signed_chunk_digests_and_install(
    registry: RegistryServer, repo_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rel = _chunked_release(registry, repo_name, tmp_path)
    blob = rel.layer(PYTHON)
    manifest = json.loads(
        read_manifest(
            rel.target, tmp_path / "w", rel.result.manifest_digests[(HOST_OS, HOST_GOARCH)]
        )
    )
    ann = next(x for x in manifest["layers"] if x["digest"] == blob.digest)["annotations"]
    data = stored_blob_path(registry.data_dir, blob.digest).read_bytes()
    size = int(ann[catalog.ANN_CHUNK_SIZE])
    assert len(data) > 2 * size
    assert ann[catalog.ANN_CHUNK_SHA256] == "".join(
        sha256_digest(data[i : i + size]).removeprefix("sha256:") for i in range(0, len(data), size)
    )
    kernel = next(x for x in manifest["layers"] if x["digest"] == rel.layer(KERNEL).digest)
    assert catalog.ANN_CHUNK_SIZE not in kernel["annotations"]  # one chunk: nothing to add

    use(monkeypatch, tmp_path, registry.ref(repo_name), rel.key.public)
    path = await esa.fetch_base_image("python")
    assert path.read_bytes() == rel.expected(PYTHON)


async def test_a_flipped_byte_is_caught_at_its_chunk(
    registry: RegistryServer, repo_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rel = _chunked_release(registry, repo_name, tmp_path)
    blob = rel.layer(PYTHON)
    size = 4 * MiB
    flip_stored_blob(registry.data_dir, blob.digest, offset=size + 100)
    cache = use(monkeypatch, tmp_path, registry.ref(repo_name), rel.key.public)

    with pytest.raises(AssetChecksumError) as info:
        await esa.fetch_base_image("python")

    assert f"chunk 1 (bytes {size}-{2 * size - 1}) of blob {blob.digest}" in str(info.value)
    assert installed(cache) == []
    assert [p for p in cache.glob("v*/.*") if p.is_file()] == [], "no temp file is left"
