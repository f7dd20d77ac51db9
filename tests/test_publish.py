"""The publisher against real servers (distribution 2.8, token and htpasswd auth)
and a real independent client (skopeo): what it writes is standard OCI, signed,
idempotent, and a failure never leaves the release tag behind."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import IO, Any, cast

import httpx
import pytest
import zstandard

from exec_sandbox_assets.base.errors import (
    AssetDownloadError,
    AuthError,
    ConfigError,
    SignatureError,
    TransportError,
)
from exec_sandbox_assets.cli.publish import KEY_PASSWORD_ENV, main
from exec_sandbox_assets.oci.layout import LayoutReader
from exec_sandbox_assets.oci.model import (
    ACCEPT_MANIFESTS,
    EMPTY_DIGEST,
    MEDIA_TYPE_EMPTY,
    MEDIA_TYPE_INDEX,
    Index,
    Manifest,
    signature_tag,
)
from exec_sandbox_assets.oci.registry_target import RegistryTarget
from exec_sandbox_assets.publish import PublishRequest, make_sample_inputs, publish
from exec_sandbox_assets.publish.compress import compress_file, inspect_zst
from exec_sandbox_assets.publish.release_dir import (
    INDEX_FILE,
    SIGNATURE_FILE,
    SUMS_FILE,
    manifest_file,
    payload_file,
)
from exec_sandbox_assets.release import catalog, keys, policy, signing
from servers import RegistryServer, free_port

VERSION = "0.9.1"
TAG = f"v{VERSION}"
CREATED = "2026-01-02T03:04:05Z"
SIZE = 48 * 1024  # per sample file: enough to compress, small enough to be quick
PLATFORMS = (("linux", "amd64"), ("linux", "arm64"))
SKOPEO = "/usr/bin/skopeo"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def no_docker_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty docker config dir, so no credentials of the machine leak in."""
    path = tmp_path / "docker-config"
    path.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(path))
    return path


@pytest.fixture(scope="module")
def skopeo() -> str:
    # Fail, never skip: the interop proof must run in CI.
    if not Path(SKOPEO).exists() and shutil.which("skopeo") is None:
        pytest.fail("skopeo is not installed (Debian: apt-get install -y skopeo)", pytrace=False)
    return SKOPEO if Path(SKOPEO).exists() else str(shutil.which("skopeo"))


@pytest.fixture
def dist(tmp_path: Path) -> Path:
    return make_sample_inputs(tmp_path / "dist", size=SIZE)


@pytest.fixture
def key_files(tmp_path: Path) -> tuple[Path, Path]:
    """(private, public) of a fresh ECDSA P-256 key."""
    key = keys.generate_key()
    private, public = tmp_path / "release.key", tmp_path / "release.pub"
    keys.write_key_pair(key, private, public, None)
    return private, public


@pytest.fixture
def other_public(tmp_path: Path) -> Path:
    key = keys.generate_key()
    keys.write_key_pair(key, tmp_path / "other.key", tmp_path / "other.pub", None)
    return tmp_path / "other.pub"


def request(
    dist: Path, key: Path, targets: tuple[str, ...], work: Path, **kwargs: Any
) -> PublishRequest:
    options: dict[str, Any] = {"created": CREATED, "level": 3, "platforms": PLATFORMS}
    options.update(kwargs)
    return PublishRequest(
        inputs=(dist,), version=VERSION, targets=targets, keys=(key,), work_dir=work, **options
    )


def run_skopeo(skopeo: str, *args: str) -> str:
    proc = subprocess.run([skopeo, *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"skopeo {' '.join(args)} failed: {proc.stderr}"
    return proc.stdout


def inspect_raw(skopeo: str, registry: RegistryServer, repo: str, ref: str) -> bytes:
    sep = "@" if ref.startswith("sha256:") else ":"
    out = run_skopeo(
        skopeo,
        "inspect",
        "--raw",
        "--tls-verify=false",
        f"docker://{registry.host}/{repo}{sep}{ref}",
    )
    return out.encode()


def get_blob(registry: RegistryServer, repo: str, digest: str) -> bytes:
    resp = httpx.get(f"{registry.url}/v2/{repo}/blobs/{digest}", follow_redirects=True)
    resp.raise_for_status()
    assert "sha256:" + hashlib.sha256(resp.content).hexdigest() == digest
    return resp.content


def tag_exists(registry: RegistryServer, repo: str, tag: str) -> bool:
    resp = httpx.head(
        f"{registry.url}/v2/{repo}/manifests/{tag}",
        headers={"Accept": ", ".join(ACCEPT_MANIFESTS)},
    )
    assert resp.status_code in (200, 404), resp.status_code
    return resp.status_code == 200


def signatures_of(sig_manifest: bytes, fetch: Any) -> list[tuple[bytes, bytes]]:
    return [
        (fetch(layer.payload_digest), layer.signature)
        for layer in signing.read_signature_manifest(sig_manifest, "test")
    ]


def verify_with(
    public: Path,
    index_digest: str,
    sigs: list[tuple[bytes, bytes]],
    expected_version: str | None = VERSION,
) -> policy.VerifiedRelease:
    """What a client trusting only `public` makes of the signatures."""
    return policy.verify_index(
        policy.TrustPolicy(keys=(keys.load_public_key_file(public),)),
        index_digest,
        sigs,
        expected_version=expected_version,
        newest_accepted_created=None,
        where="test",
    )


# --------------------------------------------------------------------------- registry


def test_registry_push_is_the_spec_format(
    registry: RegistryServer,
    skopeo: str,
    dist: Path,
    key_files: tuple[Path, Path],
    other_public: Path,
    tmp_path: Path,
    repo_name: str,
) -> None:
    result = publish(request(dist, key_files[0], (registry.ref(repo_name),), tmp_path / "w"))

    raw_index = inspect_raw(skopeo, registry, repo_name, TAG)
    assert "sha256:" + hashlib.sha256(raw_index).hexdigest() == result.index_digest
    index_doc = json.loads(raw_index)
    assert index_doc["mediaType"] == MEDIA_TYPE_INDEX
    assert index_doc["artifactType"] == catalog.ARTIFACT_TYPE
    assert index_doc["annotations"][catalog.ANN_VERSION] == VERSION
    assert index_doc["annotations"][catalog.ANN_CREATED] == CREATED
    platforms = [
        (m["platform"]["os"], m["platform"]["architecture"]) for m in index_doc["manifests"]
    ]
    assert platforms == list(PLATFORMS)
    assert all("artifactType" not in m for m in index_doc["manifests"])  # SPEC.md section 3

    index = Index.from_bytes(raw_index, "index")
    for entry in index.manifests:
        assert entry.platform is not None
        raw = inspect_raw(skopeo, registry, repo_name, entry.digest)
        manifest = Manifest.from_bytes(raw, entry.digest)
        assert manifest.artifact_type == catalog.ARTIFACT_TYPE
        assert (manifest.config.media_type, manifest.config.digest, manifest.config.size) == (
            MEDIA_TYPE_EMPTY,
            EMPTY_DIGEST,
            2,
        )
        assert manifest.annotations[catalog.ANN_VERSION] == VERSION
        specs = {
            s.name: s
            for s in catalog.platform_assets(entry.platform.os, entry.platform.architecture)
        }
        assert {layer.title for layer in manifest.layers} == set(specs)
        for layer in manifest.layers:
            assert layer.title is not None
            spec = specs[layer.title]
            ann = layer.annotations
            assert layer.media_type == spec.media_type
            assert ann[catalog.ANN_KIND] == spec.kind.value
            assert ann[catalog.ANN_ARCH] == spec.arch
            assert ann.get(catalog.ANN_LANGUAGE) == (spec.language.value if spec.language else None)
            blob = get_blob(registry, repo_name, layer.digest)
            content = zstandard.ZstdDecompressor().decompress(blob) if spec.compressed else blob
            assert content == (dist / spec.output_name).read_bytes()
            assert (
                ann[catalog.ANN_CONTENT_DIGEST] == "sha256:" + hashlib.sha256(content).hexdigest()
            )
            assert ann[catalog.ANN_CONTENT_SIZE] == str(len(content))

    # The signature, as any client reads it: tag sha256-H.sig, payload blobs.
    sig_manifest = inspect_raw(skopeo, registry, repo_name, signature_tag(result.index_digest))
    sigs = signatures_of(sig_manifest, lambda d: get_blob(registry, repo_name, d))
    assert len(sigs) == 1
    assert verify_with(key_files[1], result.index_digest, sigs).created == CREATED
    with pytest.raises(SignatureError):
        verify_with(other_public, result.index_digest, sigs)
    payload, signature = sigs[0]
    changed = payload.replace(VERSION.encode(), b"9.9.9")
    assert changed != payload
    with pytest.raises(SignatureError):
        verify_with(key_files[1], result.index_digest, [(changed, signature)], None)


def test_skopeo_copy_all_keeps_every_digest(
    registry: RegistryServer,
    skopeo: str,
    dist: Path,
    key_files: tuple[Path, Path],
    tmp_path: Path,
    repo_name: str,
) -> None:
    result = publish(request(dist, key_files[0], (registry.ref(repo_name),), tmp_path / "w"))
    layout = tmp_path / "copy"
    run_skopeo(
        skopeo,
        "copy",
        "--all",
        "--preserve-digests",
        "--src-tls-verify=false",
        f"docker://{registry.host}/{repo_name}:{TAG}",
        f"oci:{layout}:{TAG}",
    )
    with LayoutReader.open(layout) as reader:
        assert reader.resolve(TAG).digest == result.index_digest
        index = Index.from_bytes(reader.read_blob(result.index_digest, 1 << 20), "copy")
        assert {d.digest for d in index.manifests} == set(result.manifest_digests.values())
        for entry in index.manifests:
            manifest = Manifest.from_bytes(reader.read_blob(entry.digest, 1 << 20), "copy")
            for layer in manifest.layers:
                assert reader.has_blob(layer.digest)


def test_second_publish_uploads_nothing_and_keeps_digests(
    registry: RegistryServer,
    dist: Path,
    key_files: tuple[Path, Path],
    tmp_path: Path,
    repo_name: str,
) -> None:
    target = (registry.ref(repo_name),)
    first = publish(request(dist, key_files[0], target, tmp_path / "w1"))
    assert first.blobs_uploaded > 0 and first.blobs_skipped == 0
    # A fresh work dir recompresses (deterministic), and no `created`: the tag's is reused.
    second = publish(request(dist, key_files[0], target, tmp_path / "w2", created=None))
    assert second.blobs_uploaded == 0
    assert second.blobs_skipped == first.blobs_uploaded
    assert second.created == CREATED
    assert second.index_digest == first.index_digest
    assert second.manifest_digests == first.manifest_digests
    assert second.signature_digest == first.signature_digest  # the signature is kept


def test_different_content_under_an_existing_tag_is_refused(
    registry: RegistryServer,
    dist: Path,
    key_files: tuple[Path, Path],
    tmp_path: Path,
    repo_name: str,
) -> None:
    target = (registry.ref(repo_name),)
    first = publish(request(dist, key_files[0], target, tmp_path / "w"))
    (dist / "initramfs-x86_64").write_bytes(b"rebuilt")
    with pytest.raises(ConfigError, match="refusing to move a release tag"):
        publish(request(dist, key_files[0], target, tmp_path / "w"))
    digest = (
        "sha256:"
        + hashlib.sha256(
            httpx.get(
                f"{registry.url}/v2/{repo_name}/manifests/{TAG}",
                headers={"Accept": MEDIA_TYPE_INDEX},
            ).content
        ).hexdigest()
    )
    assert digest == first.index_digest
    replaced = publish(request(dist, key_files[0], target, tmp_path / "w", replace=True))
    assert replaced.index_digest != first.index_digest


def test_chunked_upload_never_sends_more_than_a_chunk(
    registry: RegistryServer, fault_proxy: Any, tmp_path: Path, repo_name: str
) -> None:
    proxy = fault_proxy(registry)
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(300 * 1024))
    digest = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
    target = RegistryTarget.connect(proxy.ref(repo_name), chunk_size=64 * 1024)
    target.push_blob(blob, digest, blob.stat().st_size)
    patches = [r for r in proxy.requests if r.method == "PATCH"]
    assert len(patches) == 5
    assert all(int(r.headers["content-length"]) <= 64 * 1024 for r in patches)
    assert get_blob(registry, repo_name, digest) == blob.read_bytes()
    target.push_blob(blob, digest, blob.stat().st_size)
    assert (target.stats.blobs_uploaded, target.stats.blobs_skipped) == (1, 1)
    target.close(True)


# --------------------------------------------------------------------------- auth


def test_token_registry_needs_credentials(
    token_registry: RegistryServer,
    dist: Path,
    key_files: tuple[Path, Path],
    tmp_path: Path,
    repo_name: str,
    no_docker_config: Path,
) -> None:
    target = (token_registry.ref(repo_name),)
    with pytest.raises(AuthError) as info:
        publish(request(dist, key_files[0], target, tmp_path / "w"))
    assert token_registry.host in str(info.value) and "--username" in str(info.value)
    with pytest.raises(AuthError, match="refused"):
        publish(
            request(dist, key_files[0], target, tmp_path / "w", username="pusher", password="wrong")
        )
    result = publish(
        request(dist, key_files[0], target, tmp_path / "w", username="pusher", password="s3cret")
    )
    assert result.blobs_uploaded > 0
    # Credentials from $DOCKER_CONFIG/config.json, as `docker login` leaves them.
    auth = "cHVzaGVyOnMzY3JldA=="  # base64("pusher:s3cret")
    (no_docker_config / "config.json").write_text(
        json.dumps({"auths": {token_registry.host: {"auth": auth}}})
    )
    again = publish(request(dist, key_files[0], target, tmp_path / "w"))
    assert again.blobs_uploaded == 0 and again.index_digest == result.index_digest


def test_htpasswd_registry_needs_credentials(
    htpasswd_registry: RegistryServer,
    dist: Path,
    key_files: tuple[Path, Path],
    tmp_path: Path,
    repo_name: str,
) -> None:
    target = (htpasswd_registry.ref(repo_name),)
    with pytest.raises(AuthError) as info:
        publish(request(dist, key_files[0], target, tmp_path / "w"))
    assert htpasswd_registry.host in str(info.value) and "docker login" in str(info.value)
    with pytest.raises(AuthError):
        publish(
            request(dist, key_files[0], target, tmp_path / "w", username="alice", password="rabbit")
        )
    result = publish(
        request(dist, key_files[0], target, tmp_path / "w", username="alice", password="wonderland")
    )
    assert result.blobs_uploaded > 0


# --------------------------------------------------------------------------- bad input


def _cli(dist: Path, key: Path, target: str, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--input",
        str(dist),
        "--version",
        VERSION,
        "--to",
        target,
        "--key",
        str(key),
        "--level",
        "3",
        "--created",
        CREATED,
        "--work-dir",
        str(tmp_path / "w"),
        *extra,
    ]


_BAD_INPUTS = {
    "missing": (2, r"missing 1 required file.*initramfs-aarch64\[\.zst\].*searched: "),
    "misnamed": (
        2,
        r"vmlinuz-x86_64\[\.zst\].*likely misnamed: .*vmlinuz-x86-64 "
        r"\(did you mean vmlinuz-x86_64\?\)",
    ),
    "unreadable-key": (2, r"cannot read private key file"),
    "not-a-key": (2, r"signing needs the private key"),
    "wrong-password": (2, r"wrong password"),
    "no-password": (2, r"encrypted and no password is available: set EXEC_SANDBOX_SIGNING"),
    "unreachable": (1, r"cannot reach registry 127\.0\.0\.1:\d+ .*Connection refused"),
}


@pytest.mark.parametrize("case", list(_BAD_INPUTS))
def test_bad_input_is_one_clear_line_and_no_tag(
    case: str,
    registry: RegistryServer,
    dist: Path,
    key_files: tuple[Path, Path],
    tmp_path: Path,
    repo_name: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code, message = _BAD_INPUTS[case]
    key = key_files[0]
    extra: list[str] = []
    if case == "missing":
        (dist / "initramfs-aarch64").unlink()
    elif case == "misnamed":
        (dist / "vmlinuz-x86_64").rename(dist / "vmlinuz-x86-64")
    elif case == "unreadable-key":
        key = tmp_path / "absent.key"
    elif case == "not-a-key":
        key = key_files[1]  # the public half
    elif case in ("wrong-password", "no-password"):
        key = tmp_path / "encrypted.key"
        keys.write_key_pair(keys.generate_key(), key, tmp_path / "encrypted.pub", b"right")
        if case == "wrong-password":
            monkeypatch.setenv(KEY_PASSWORD_ENV, "wrong")
    elif case == "unreachable":
        extra = ["--to", f"http://127.0.0.1:{free_port()}/{repo_name}"]

    code_got = main(_cli(dist, key, registry.ref(repo_name), tmp_path, *extra))
    err = capsys.readouterr().err
    assert code_got == code, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not tag_exists(registry, repo_name, TAG)
    # Everything fails before the first upload: the repository was never created.
    catalog_doc = httpx.get(f"{registry.url}/v2/_catalog").json()
    assert repo_name not in (catalog_doc.get("repositories") or [])


def test_cli_publishes_and_prints_a_summary(
    registry: RegistryServer,
    dist: Path,
    key_files: tuple[Path, Path],
    tmp_path: Path,
    repo_name: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = tmp_path / "encrypted.key"
    keys.write_key_pair(keys.generate_key(), key, tmp_path / "encrypted.pub", b"pw")
    monkeypatch.setenv(KEY_PASSWORD_ENV, "pw")
    code = main(
        _cli(dist, key, registry.ref(repo_name), tmp_path, "--latest", "--platform", "linux/amd64")
    )
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith(f"published {VERSION} (created {CREATED})")
    assert "linux/amd64" in out and "linux/arm64" not in out
    assert tag_exists(registry, repo_name, TAG) and tag_exists(registry, repo_name, "latest")


# --------------------------------------------------------------------------- layout, release dir


def test_layout_archive_and_release_dir_match_the_registry(
    registry: RegistryServer,
    dist: Path,
    key_files: tuple[Path, Path],
    tmp_path: Path,
    repo_name: str,
) -> None:
    pushed = publish(request(dist, key_files[0], (registry.ref(repo_name),), tmp_path / "w1"))
    layout, archive, release = tmp_path / "layout", tmp_path / "release.tar", tmp_path / "rel"
    code = main(
        _cli(
            dist,
            key_files[0],
            f"oci:{layout}",
            tmp_path,
            "--to",
            f"oci-archive:{archive}",
            "--release-dir",
            str(release),
            "--platform",
            "linux/amd64",
            "--platform",
            "linux/arm64",
        )
    )
    assert code == 0
    with LayoutReader.open(layout) as reader:
        assert reader.resolve(TAG).digest == pushed.index_digest
        assert signature_tag(pushed.index_digest) in reader.tags()
    with LayoutReader.open(archive, archive=True) as reader:
        assert reader.resolve(TAG).digest == pushed.index_digest

    # SPEC.md section 6: every file, exact bytes, checksums `sha256sum -c` accepts.
    index_bytes = (release / INDEX_FILE).read_bytes()
    assert "sha256:" + hashlib.sha256(index_bytes).hexdigest() == pushed.index_digest
    expected = {INDEX_FILE, SIGNATURE_FILE, SUMS_FILE, payload_file(0)}
    for os_, goarch in PLATFORMS:
        name = manifest_file(os_, goarch)
        expected.add(name)
        data = (release / name).read_bytes()
        assert (
            "sha256:" + hashlib.sha256(data).hexdigest() == pushed.manifest_digests[(os_, goarch)]
        )
        for layer in Manifest.from_bytes(data, name).layers:
            assert layer.title is not None
            expected.add(layer.title)
            blob = (release / layer.title).read_bytes()
            assert "sha256:" + hashlib.sha256(blob).hexdigest() == layer.digest
    assert {p.name for p in release.iterdir()} == expected
    gvproxy = [name for name in expected if name.startswith("gvproxy")]
    assert gvproxy and all((release / n).stat().st_mode & 0o111 for n in gvproxy)  # mode kept
    check = subprocess.run(
        ["sha256sum", "-c", SUMS_FILE], cwd=release, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert len(check.stdout.splitlines()) == len(expected) - 1

    # Offline verification from the folder alone.
    sig = (release / SIGNATURE_FILE).read_bytes()
    payloads = {
        "sha256:" + hashlib.sha256(p).hexdigest(): p
        for p in ((release / payload_file(0)).read_bytes(),)
    }
    verify_with(key_files[1], pushed.index_digest, signatures_of(sig, payloads.__getitem__))


def test_rotation_signs_with_every_key(
    dist: Path, key_files: tuple[Path, Path], tmp_path: Path
) -> None:
    new_key = tmp_path / "new.key"
    keys.write_key_pair(keys.generate_key("ed25519"), new_key, tmp_path / "new.pub", None)
    layout = tmp_path / "layout"
    result = publish(
        PublishRequest(
            inputs=(dist,),
            version=VERSION,
            targets=(f"oci:{layout}",),
            keys=(key_files[0], new_key),
            work_dir=tmp_path / "w",
            created=CREATED,
            level=3,
            tag_latest=True,
        )
    )
    assert result.signers == 2
    with LayoutReader.open(layout) as reader:
        assert reader.resolve("latest").digest == result.index_digest
        sig = reader.read_blob(reader.resolve(result.signature_tag).digest, 1 << 20)
        sigs = signatures_of(sig, lambda d: reader.read_blob(d, 1 << 16))
        assert len(sigs) == 2
        for pub in (key_files[1], tmp_path / "new.pub"):
            verify_with(pub, result.index_digest, sigs)


# --------------------------------------------------------------------------- inputs, compression


def test_precompressed_inputs_are_taken_as_is(
    dist: Path, key_files: tuple[Path, Path], tmp_path: Path
) -> None:
    raw = dist / "raw-base-x86_64.qcow2"
    zst = dist / "raw-base-x86_64.qcow2.zst"
    zst.write_bytes(zstandard.ZstdCompressor(level=1).compress(raw.read_bytes()))
    raw.unlink()
    layout = tmp_path / "layout"
    publish(
        request(
            dist, key_files[0], (f"oci:{layout}",), tmp_path / "w", platforms=(("linux", "amd64"),)
        )
    )
    with LayoutReader.open(layout) as reader:
        index = Index.from_bytes(reader.read_blob(reader.resolve(TAG).digest, 1 << 20), "i")
        manifest = Manifest.from_bytes(reader.read_blob(index.manifests[0].digest, 1 << 20), "m")
    (layer,) = [x for x in manifest.layers if x.title == zst.name]
    assert layer.digest == "sha256:" + hashlib.sha256(zst.read_bytes()).hexdigest()
    content = zstandard.ZstdDecompressor().decompress(zst.read_bytes())
    assert layer.annotations[catalog.ANN_CONTENT_DIGEST] == (
        "sha256:" + hashlib.sha256(content).hexdigest()
    )

    zst.write_bytes(zst.read_bytes()[:-100])  # truncated
    with pytest.raises(ConfigError, match=r"raw-base-x86_64\.qcow2\.zst"):
        publish(request(dist, key_files[0], (f"oci:{layout}",), tmp_path / "w"))
    zst.write_bytes(b"not zstd at all")
    with pytest.raises(ConfigError, match="not a zstd file"):
        inspect_zst(zst)


def test_compression_is_deterministic(tmp_path: Path) -> None:
    src = make_sample_inputs(tmp_path / "in", arches=("x86_64",), size=300 * 1024)
    data = (src / "vmlinuz-x86_64").read_bytes()
    a = compress_file(src / "vmlinuz-x86_64", tmp_path / "a.zst", 19)
    b = compress_file(src / "vmlinuz-x86_64", tmp_path / "b.zst", 19)
    assert (a.digest, a.size) == (b.digest, b.size)
    # The same bytes with one worker thread and other write sizes: neither is a factor.
    out = bytearray()

    class Sink:
        def write(self, chunk: bytes) -> int:
            out.extend(chunk)
            return len(chunk)

    cctx = zstandard.ZstdCompressor(
        level=19, threads=1, write_content_size=True, write_checksum=True
    )
    with cctx.stream_writer(cast(IO[bytes], Sink()), size=len(data), closefd=False) as z:
        for i in range(0, len(data), 4096):
            z.write(data[i : i + 4096])
    assert (tmp_path / "a.zst").read_bytes() == bytes(out)
    assert a.content_digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert inspect_zst(tmp_path / "a.zst") == a


# --------------------------------------------------------------------------- failures, TLS, imports


def test_failure_mid_push_leaves_no_tag_and_a_rerun_completes(
    registry: RegistryServer,
    fault_proxy: Any,
    dist: Path,
    key_files: tuple[Path, Path],
    tmp_path: Path,
    repo_name: str,
) -> None:
    proxy = fault_proxy(registry)
    proxy.match_path = "/manifests/sha256:"  # every manifest PUT by digest, after the blobs
    proxy.fail_first, proxy.fail_status, proxy.retry_after = 100, 503, "0"
    target = (proxy.ref(repo_name),)
    with pytest.raises(AssetDownloadError, match="503"):
        publish(request(dist, key_files[0], target, tmp_path / "w"))
    assert any(r.method == "PATCH" for r in proxy.requests)  # blobs went up
    assert not tag_exists(registry, repo_name, TAG)

    proxy.reset()
    result = publish(request(dist, key_files[0], target, tmp_path / "w"))
    assert result.blobs_uploaded == 2  # only the signature config and payload were left
    assert tag_exists(registry, repo_name, TAG)


def test_tls_registry_needs_its_ca(
    tls_registry: RegistryServer,
    dist: Path,
    key_files: tuple[Path, Path],
    tmp_path: Path,
    repo_name: str,
) -> None:
    target = (f"https://{tls_registry.host}/{repo_name}",)
    with pytest.raises(TransportError, match="--ca-bundle"):
        publish(request(dist, key_files[0], target, tmp_path / "w"))
    result = publish(
        request(dist, key_files[0], target, tmp_path / "w", ca_bundle=tls_registry.ca_bundle)
    )
    assert result.blobs_uploaded > 0


def test_publisher_stays_off_the_client_import_path() -> None:
    code = (
        "import sys, exec_sandbox_assets, exec_sandbox_assets.publish;"
        "print(sorted(m for m in ('oras', 'requests') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    client = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, exec_sandbox_assets;print('exec_sandbox_assets.publish' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert client.stdout.strip() == "False"


def test_default_platforms_follow_the_gvproxy_builds(
    tmp_path: Path, key_files: tuple[Path, Path]
) -> None:
    dist = make_sample_inputs(tmp_path / "dist", oses=("linux", "darwin"), size=8 * 1024)
    (dist / "gvproxy-wrapper-darwin-amd64").unlink()  # not built: not published
    layout = tmp_path / "layout"
    result = publish(
        request(dist, key_files[0], (f"oci:{layout}",), tmp_path / "w", platforms=None)
    )
    assert list(result.manifest_digests) == [
        ("linux", "amd64"),
        ("linux", "arm64"),
        ("darwin", "arm64"),
    ]
    # darwin/arm64 shares the aarch64 VM files: stored once.
    vm_files = 6 + 5  # x86_64 (with vmlinux) + aarch64
    gvproxies = 3
    assert result.blobs_uploaded == vm_files + gvproxies + 3  # + empty, sig config, payload


@pytest.mark.parametrize(
    ("version", "message"),
    [("latest", "add --latest"), ("1.0+build", "letters, digits"), ("", "letters, digits")],
)
def test_versions_no_client_can_ask_for_are_refused(version: str, message: str) -> None:
    from exec_sandbox_assets.publish.publisher import normalize_version

    with pytest.raises(ConfigError, match=message):
        normalize_version(version)
    assert normalize_version("v0.22.0") == "0.22.0"
