"""The publisher's keyless signature (issue 17; docs/format.md §8): signed by an injected
signer (here the private test Sigstore instance), verified with the given trusted roots
and the workflow policy before any tag moves, stored as an OCI 1.1 referrer of the index
(registry, layout, archive) and in the GitHub Release folder; read back with
`Source.bundles()` and verified with `release.keyless.verify_bundle`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from exec_sandbox_assets.base.errors import ConfigError, SignatureError
from exec_sandbox_assets.cli.publish import main as publish_main
from exec_sandbox_assets.client import AssetClient
from exec_sandbox_assets.config import Settings
from exec_sandbox_assets.oci.model import Manifest
from exec_sandbox_assets.oci.referrers import BUNDLE_MEDIA_TYPE, fallback_tag
from exec_sandbox_assets.publish import PublishRequest, PublishResult, make_sample_inputs, publish
from exec_sandbox_assets.publish.keyless import KeylessOptions, Signer, ambient_signer
from exec_sandbox_assets.publish.release_dir import BUNDLE_FILE, SUMS_FILE
from exec_sandbox_assets.release import catalog, keyless
from releases import TEST_WORKFLOW, make_key_pair, read_bundles, read_manifest, verify_keyless
from servers import RegistryServer, StaticServer, free_port
from sigstore_instance import SigstoreInstance

VERSION = "0.9.3"
CREATED = "2026-03-04T05:06:07Z"
PLATFORMS = (("linux", "amd64"),)
WORKFLOW = TEST_WORKFLOW


def _signer(instance: SigstoreInstance, ref: str = f"refs/tags/v{VERSION}") -> Signer:
    calls: list[bytes] = []

    def sign(statement: bytes) -> bytes:
        calls.append(statement)
        return instance.bundle(statement, workflow_ref=f"{WORKFLOW}@{ref}")

    sign.calls = calls  # type: ignore[attr-defined]
    return sign


def _options(signer: Signer, *roots: Path) -> KeylessOptions:
    return KeylessOptions(signer, (keyless.Workflow(WORKFLOW),), tuple(roots))


def _publish(targets: tuple[str, ...], dist: Path, work: Path, **options: Any) -> PublishResult:
    return publish(
        PublishRequest(
            inputs=(dist,),
            version=VERSION,
            targets=targets,
            work_dir=work,
            created=CREATED,
            level=3,
            platforms=PLATFORMS,
            **{"keys": (), **options},
        )
    )


def test_keyless_release_is_stored_as_a_referrer_everywhere_and_verifies(
    registry: RegistryServer,
    repo_name: str,
    tmp_path: Path,
    sigstore_test_instance: SigstoreInstance,
    sigstore_root: Path,
) -> None:
    dist = make_sample_inputs(tmp_path / "dist", size=16 * 1024)
    targets = (
        registry.ref(repo_name),
        f"oci:{tmp_path / 'layout'}",
        f"oci-archive:{tmp_path / 'assets.tar'}",
    )
    signer = _signer(sigstore_test_instance)
    key = make_key_pair(tmp_path / "keys", "k")
    result = _publish(
        targets,
        dist,
        tmp_path / "work",
        keys=(key.private,),  # both kinds on one release
        keyless=_options(signer, sigstore_root),
        release_dir=tmp_path / "release",
    )

    assert signer.calls == [keyless.statement(result.index_digest, VERSION, CREATED)]  # type: ignore[attr-defined]
    assert result.keyless_identity == f"{WORKFLOW}@refs/tags/v{VERSION}"
    assert result.signature_digest is not None and result.signatures == 1
    folder_bundle = (tmp_path / "release" / BUNDLE_FILE).read_bytes()
    assert BUNDLE_FILE in result.release_files
    assert BUNDLE_FILE in (tmp_path / "release" / SUMS_FILE).read_text()
    for text in targets:
        assert read_bundles(text, result.index_digest) == [folder_bundle], text
    signed = verify_keyless(folder_bundle, result.index_digest, VERSION, sigstore_root)
    assert (signed.version, signed.created) == (VERSION, CREATED)

    # The referrer is cosign 3's: artifactType, empty config, subject = the index.
    referrers = read_manifest(targets[0], tmp_path / "read", fallback_tag(result.index_digest))
    entry = json.loads(referrers)["manifests"][0]
    assert entry["digest"] == result.bundle_digest
    assert entry["artifactType"] == BUNDLE_MEDIA_TYPE
    assert entry["annotations"]["dev.sigstore.bundle.predicateType"] == keyless.PREDICATE_TYPE
    manifest = Manifest.from_bytes(
        read_manifest(targets[0], tmp_path / "read", entry["digest"]), "m"
    )
    assert manifest.subject is not None and manifest.subject.digest == result.index_digest
    assert manifest.config.media_type == "application/vnd.oci.empty.v1+json"
    assert [layer.media_type for layer in manifest.layers] == [BUNDLE_MEDIA_TYPE]

    # Re-running signs nothing and moves no digest: the bundle on the targets is kept.
    never: Signer = lambda _s: pytest.fail("signed again")  # noqa: E731
    again = _publish(
        targets,
        dist,
        tmp_path / "work",
        keys=(key.private,),
        keyless=_options(never, sigstore_root),
        release_dir=tmp_path / "release",
    )
    assert again.bundle_digest == result.bundle_digest
    assert (
        read_manifest(targets[0], tmp_path / "read", fallback_tag(result.index_digest)) == referrers
    )


def test_keyless_only_release_has_no_key_signature(
    tmp_path: Path, sigstore_test_instance: SigstoreInstance, sigstore_root: Path
) -> None:
    dist = make_sample_inputs(tmp_path / "dist", size=16 * 1024)
    layout = f"oci:{tmp_path / 'layout'}"
    result = _publish(
        (layout,),
        dist,
        tmp_path / "work",
        keyless=_options(_signer(sigstore_test_instance), sigstore_root),
    )
    assert result.signature_digest is None and result.signers == 0
    (bundle,) = read_bundles(layout, result.index_digest)
    verify_keyless(bundle, result.index_digest, VERSION, sigstore_root)
    index = json.loads((tmp_path / "layout" / "index.json").read_text())
    tags = {m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]}
    assert tags == {f"v{VERSION}", fallback_tag(result.index_digest)}


@pytest.mark.parametrize("why", ["branch", "oldest root"])
def test_a_bundle_that_does_not_verify_moves_no_tag(
    why: str,
    tmp_path: Path,
    sigstore_test_instance: SigstoreInstance,
    sigstore_root: Path,
) -> None:
    """A signature from a branch run, or one the oldest supported client's root does
    not know (a Sigstore key rotation), fails the release before any tag moves."""
    dist = make_sample_inputs(tmp_path / "dist", size=16 * 1024)
    layout = tmp_path / "layout"
    roots = [sigstore_root]
    ref = f"refs/tags/v{VERSION}"
    if why == "branch":
        ref = "refs/heads/main"
    else:
        roots.append(SigstoreInstance.create("older").write_root(tmp_path / "older-root.json"))
    with pytest.raises(SignatureError, match="keyless signature refused"):
        _publish(
            (f"oci:{layout}",),
            dist,
            tmp_path / "work",
            keyless=_options(_signer(sigstore_test_instance, ref), *roots),
            release_dir=tmp_path / "release",
        )
    index = json.loads((layout / "index.json").read_text())
    assert index["manifests"] == []  # neither vV nor the referrers tag
    assert not (tmp_path / "release").exists()


def test_cli_stores_a_premade_bundle(
    tmp_path: Path,
    sigstore_test_instance: SigstoreInstance,
    sigstore_root: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`publish --keyless-bundle FILE`: a bundle made elsewhere over this release's
    statement (here after a key-signed publish) is verified and added."""
    dist = make_sample_inputs(tmp_path / "dist", size=16 * 1024)
    key = make_key_pair(tmp_path / "keys", "k")
    layout = f"oci:{tmp_path / 'layout'}"
    base = ["-i", str(dist), "--version", VERSION, "--to", layout, "--created", CREATED]
    base += ["--platform", "linux/amd64", "--level", "3", "--key", str(key.private), "--json"]
    assert publish_main(base) == 0
    index_digest = json.loads(capsys.readouterr().out)["index_digest"]
    bundle = tmp_path / "bundle.json"
    bundle.write_bytes(
        sigstore_test_instance.bundle(
            keyless.statement(index_digest, VERSION, CREATED),
            workflow_ref=f"{WORKFLOW}@refs/tags/v{VERSION}",
        )
    )
    keyless_args = ["--keyless-bundle", str(bundle), "--keyless-workflow", WORKFLOW]
    keyless_args += ["--sigstore-root", str(sigstore_root)]

    assert publish_main([*base, *keyless_args]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["index_digest"] == index_digest
    assert out["keyless_identity"] == f"{WORKFLOW}@refs/tags/v{VERSION}"
    assert read_bundles(layout, index_digest) == [bundle.read_bytes()]

    other = ["--keyless-workflow", WORKFLOW.replace("release.yml", "other.yml")]
    assert publish_main([*base, *keyless_args[:2], *other, *keyless_args[4:]]) == 1
    assert "keyless signature refused" in capsys.readouterr().err


def test_client_pulls_a_keyless_release_from_the_release_folder_alone(
    tmp_path: Path,
    static_server: StaticServer,
    sigstore_test_instance: SigstoreInstance,
    sigstore_root: Path,
) -> None:
    """The GitHub Releases fallback carries the bundle: a client trusting no key, only
    the workflow (and the test instance's root), verifies the folder and pulls."""
    dist = make_sample_inputs(tmp_path / "dist", size=16 * 1024)
    folder = static_server.root / "o" / "r" / "releases" / "download" / f"v{VERSION}"
    _publish(
        (),
        dist,
        tmp_path / "work",
        keyless=_options(_signer(sigstore_test_instance), sigstore_root),
        release_dir=folder,
    )
    assert not (folder / "oci-signature.json").exists()

    def client(workflow: str) -> AssetClient:
        return AssetClient(
            Settings(
                cache_dir=tmp_path / f"cache-{len(workflow)}",
                local_build_dir=None,
                gvproxy_build_dir=None,
                version=VERSION,
                registry=f"http://127.0.0.1:{free_port()}/test/gone",  # refused: next source
                releases_url=f"{static_server.url}/o/r/releases/download",
                trusted_keys=(),
                trusted_workflows=(workflow,),
                sigstore_root=sigstore_root,
                docker_config=tmp_path / "no-docker-config.json",
                host_os="linux",
                host_goarch="amd64",
            )
        )

    spec = catalog.kernel("x86_64")
    paths = asyncio.run(client(WORKFLOW).fetch([spec]))
    assert paths[spec.output_name].read_bytes() == (dist / spec.output_name).read_bytes()
    with pytest.raises(SignatureError, match="keyless signature refused"):
        asyncio.run(client(WORKFLOW.replace("release.yml", "nightly.yml")).fetch([spec]))


@pytest.mark.parametrize("in_actions", [False, True])
def test_keyless_without_an_oidc_token_fails_before_any_write(
    in_actions: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside CI, or in a GitHub job without `id-token: write` (no token request
    variables), `--keyless` is a usage error naming the permission; nothing is tagged."""
    for name in (
        "ACTIONS_ID_TOKEN_REQUEST_URL",
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN",
        "GITHUB_ACTIONS",
    ):
        monkeypatch.delenv(name, raising=False)
    if in_actions:
        monkeypatch.setenv("GITHUB_ACTIONS", "true")
    dist = make_sample_inputs(tmp_path / "dist", size=16 * 1024)
    layout = tmp_path / "layout"
    with pytest.raises(ConfigError, match="id-token: write"):
        _publish(
            (f"oci:{layout}",), dist, tmp_path / "work", keyless=KeylessOptions(ambient_signer)
        )
    assert json.loads((layout / "index.json").read_text())["manifests"] == []
