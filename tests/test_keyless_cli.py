"""Keyless releases end to end: a release in a real registry (docker-registry) with a
Sigstore bundle made by the test instance, stored as an OCI referrer under the
`sha256-<hex>` fallback tag, pulled by the command line with no key and only
EXEC_SANDBOX_SIGSTORE_ROOT and EXEC_SANDBOX_TRUSTED_WORKFLOWS set; every bad bundle is
refused with exit 3 and one line naming the identity found and the one wanted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exec_sandbox_assets.oci.model import (
    EMPTY_JSON,
    MEDIA_TYPE_INDEX,
    MEDIA_TYPE_MANIFEST,
    Descriptor,
)
from exec_sandbox_assets.oci.referrers import (
    BUNDLE_MEDIA_TYPE,
    fallback_tag,
    merge_referrer,
    referrer_descriptor,
    referrer_manifest,
)
from exec_sandbox_assets.release import keyless
from releases import SampleRelease, open_writer, publish_sample_release
from servers import RegistryServer
from sigstore_instance import Flaw, SigstoreInstance

WORKFLOW = "https://github.com/acme/assets/.github/workflows/release.yml"
ISSUER = "https://token.actions.githubusercontent.com"
VERSION = "1.0.0"
CLI = [sys.executable, "-m", "exec_sandbox_assets.cli"]


def store_only_bundle(release: SampleRelease, work: Path, bundle: bytes) -> None:
    """Make `bundle` the one Sigstore referrer of the release index (the fallback tag
    rewritten to list it alone, as an attacker controlling the registry could)."""
    writer = open_writer(release.target, work)
    try:
        index = writer.read_manifest(release.index_digest)
        assert index is not None
        subject = Descriptor.for_bytes(MEDIA_TYPE_INDEX, index)
        writer.push_bytes(EMPTY_JSON, "empty config")
        writer.push_bytes(bundle, BUNDLE_MEDIA_TYPE)
        data = referrer_manifest(
            subject, BUNDLE_MEDIA_TYPE, [Descriptor.for_bytes(BUNDLE_MEDIA_TYPE, bundle)]
        )
        writer.put_manifest(data, MEDIA_TYPE_MANIFEST, None)
        entry = referrer_descriptor(data, release.index_digest, "test referrer")
        writer.put_manifest(
            merge_referrer(None, entry), MEDIA_TYPE_INDEX, fallback_tag(release.index_digest)
        )
    finally:
        writer.close(True)


def cli(root: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """The command line as a default-configured user runs it: no key, no trust flag;
    only the two keyless settings in the environment."""
    env = {
        **os.environ,
        "EXEC_SANDBOX_SIGSTORE_ROOT": str(root),
        "EXEC_SANDBOX_TRUSTED_WORKFLOWS": WORKFLOW,
    }
    return subprocess.run(
        [*CLI, *map(str, args)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def pull(cache: Path, ref: str, root: Path) -> subprocess.CompletedProcess[str]:
    return cli(
        root,
        "--cache-dir",
        cache,
        "--asset-version",
        VERSION,
        "--mirror",
        ref,
        "--airgap",
        "pull",
        "--json",
    )


@pytest.fixture
def published(registry: RegistryServer, repo_name: str, tmp_path: Path) -> SampleRelease:
    return publish_sample_release(
        registry.ref(repo_name),
        VERSION,
        tmp_path / "work",
        size=4096,
        platforms=(("linux", "amd64"), ("linux", "arm64")),
    )


def test_a_default_client_pulls_a_keyless_release_and_refuses_bad_bundles(
    published: SampleRelease,
    sigstore_test_instance: SigstoreInstance,
    sigstore_root: Path,
    tmp_path: Path,
) -> None:
    statement = keyless.statement(published.index_digest, VERSION, published.created)
    tag_ref = f"{WORKFLOW}@refs/tags/v{VERSION}"
    # A branch identity, through the real command line (every other case: below).
    branch = f"{WORKFLOW}@refs/heads/main"
    store_only_bundle(
        published,
        tmp_path / "writer",
        sigstore_test_instance.bundle(statement, workflow_ref=branch),
    )
    refused = pull(tmp_path / "cache-bad", published.target, sigstore_root)
    assert refused.returncode == 3, (refused.stdout, refused.stderr)
    lines = [
        line
        for line in refused.stderr.splitlines()
        if f"signed by {branch} (issuer {ISSUER}), wanted {tag_ref}" in line
    ]
    assert len(lines) == 1, refused.stderr
    assert {e["exit_code"] for e in json.loads(refused.stdout)["errors"]} == {3}
    names = {p.name for p in published.dist.iterdir()}
    assert not [p for p in (tmp_path / "cache-bad").rglob("*") if p.name in names]

    good = sigstore_test_instance.bundle(statement, workflow_ref=tag_ref)
    store_only_bundle(published, tmp_path / "writer", good)
    pulled = pull(tmp_path / "cache-good", published.target, sigstore_root)
    assert pulled.returncode == 0, pulled.stderr
    doc = json.loads(pulled.stdout)
    assert doc["signed_by"] == [] and doc["signed_by_identity"] == [tag_ref]
    assert doc["files"] and all(Path(f["path"]).is_file() for f in doc["files"])

    # inspect and versions name the identity too.
    seen = cli(sigstore_root, "inspect", f"{published.target}:v{VERSION}", "--json")
    assert seen.returncode == 0, seen.stderr
    signature = json.loads(seen.stdout)["signature"]
    assert signature["verified"] is True and signature["bundles"] == 1
    assert signature["verified_by_identity"] == [tag_ref]
    text = cli(sigstore_root, "inspect", f"{published.target}:v{VERSION}").stdout
    assert f"verdict: VERIFIED by 0 trusted key(s) and {tag_ref}" in text
    listed = cli(sigstore_root, "versions", published.target, "--json")
    (entry,) = json.loads(listed.stdout)["releases"]
    assert entry["signature"]["signed_by_identity"] == [tag_ref]

    # Warm: the cache records name the workflow and the root's fingerprint; the library
    # serves them with no network, no crypto and no sigstore import.
    env = {
        **os.environ,
        "EXEC_SANDBOX_CACHE_DIR": str(tmp_path / "cache-good"),
        "EXEC_SANDBOX_ASSET_VERSION": VERSION,
        "EXEC_SANDBOX_REGISTRY_MIRRORS": "http://127.0.0.1:9/unreachable",
        "EXEC_SANDBOX_AIRGAP": "1",
        "EXEC_SANDBOX_SIGSTORE_ROOT": str(sigstore_root),
        "EXEC_SANDBOX_TRUSTED_WORKFLOWS": WORKFLOW,
    }
    code = (
        "import asyncio, json, sys\n"
        "import exec_sandbox_assets as esa\n"
        "esa.configure(local_build_dir=None)\n"
        "path = asyncio.run(esa.fetch_kernel())\n"
        "heavy = ('sigstore', 'cryptography', 'httpx')\n"
        "print(json.dumps([str(path), sorted({m.split('.')[0] for m in sys.modules} & set(heavy))]))\n"
    )
    warm = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert warm.returncode == 0, warm.stderr
    path, heavy = json.loads(warm.stdout.splitlines()[-1])
    assert Path(path).is_file() and heavy == []


def _bundle_for(
    instance: SigstoreInstance, release: SampleRelease, case: str, tag_ref: str
) -> tuple[bytes, str]:
    """A bad bundle for `case`, and the identity its certificate names."""
    created = release.created
    statement = keyless.statement(release.index_digest, VERSION, created)
    other_repo = (
        f"https://github.com/evil/assets/.github/workflows/release.yml@refs/tags/v{VERSION}"
    )
    refs = {
        "branch": f"{WORKFLOW}@refs/heads/main",
        "another repository": other_repo,
        "another workflow": f"https://github.com/acme/assets/.github/workflows/ci.yml@refs/tags/v{VERSION}",
        "another version": f"{WORKFLOW}@refs/tags/v1.0.1",
    }
    if case in refs:
        return instance.bundle(statement, workflow_ref=refs[case]), refs[case]
    if case == "another issuer":
        return instance.bundle(
            statement, workflow_ref=tag_ref, issuer="https://gitlab.com"
        ), tag_ref
    if case == "another subject digest":
        other = keyless.statement("sha256:" + "0" * 64, VERSION, created)
        return instance.bundle(other, workflow_ref=tag_ref), tag_ref
    if case == "another predicate type":
        doc = json.loads(statement)
        doc["predicateType"] = "https://slsa.dev/provenance/v1"
        return instance.bundle(json.dumps(doc).encode(), workflow_ref=tag_ref), tag_ref
    if case == "another instance":
        return SigstoreInstance.create("elsewhere").bundle(statement, workflow_ref=tag_ref), tag_ref
    flaw = {
        "tampered entry timestamp": Flaw.SET,
        "tampered checkpoint": Flaw.CHECKPOINT,
        "tampered proof": Flaw.PROOF,
        "missing SCT": Flaw.NO_SCT,
        "expired at the logged time": Flaw.EXPIRED,
    }[case]
    return instance.bundle(statement, workflow_ref=tag_ref, flaw=flaw), tag_ref


CASES = (
    "branch",
    "another repository",
    "another workflow",
    "another issuer",
    "another version",
    "another subject digest",
    "another predicate type",
    "tampered entry timestamp",
    "tampered checkpoint",
    "tampered proof",
    "missing SCT",
    "expired at the logged time",
    "another instance",
)


def test_every_bad_bundle_exits_3_naming_found_and_wanted(
    published: SampleRelease,
    sigstore_test_instance: SigstoreInstance,
    sigstore_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from exec_sandbox_assets.cli import main

    monkeypatch.setenv("EXEC_SANDBOX_SIGSTORE_ROOT", str(sigstore_root))
    monkeypatch.setenv("EXEC_SANDBOX_TRUSTED_WORKFLOWS", WORKFLOW)
    tag_ref = f"{WORKFLOW}@refs/tags/v{VERSION}"
    for n, case in enumerate(CASES):
        bundle, found = _bundle_for(sigstore_test_instance, published, case, tag_ref)
        store_only_bundle(published, tmp_path / "writer", bundle)
        argv = ["--cache-dir", str(tmp_path / f"c{n}"), "--asset-version", VERSION]
        argv += ["--mirror", published.target, "--airgap", "pull"]
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 3, (case, err)
        wanted = f"signed by {found} (issuer "
        lines = [
            line for line in err.splitlines() if wanted in line and f"wanted {tag_ref}" in line
        ]
        assert len(lines) == 1, (case, err)
    # An oversized bundle is refused before it is parsed.
    store_only_bundle(published, tmp_path / "writer", b"{" + b" " * (128 * 1024) + b"}")
    assert (
        main(
            [
                "--cache-dir",
                str(tmp_path / "big"),
                "--asset-version",
                VERSION,
                "--mirror",
                published.target,
                "--airgap",
                "pull",
            ]
        )
        == 3
    )
    assert "is 131074 bytes" in capsys.readouterr().err  # Source.bundles caps it
