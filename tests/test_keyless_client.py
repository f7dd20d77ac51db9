"""Keyless releases through the client and the trust policy: a release signed by the
test Sigstore instance is accepted by a client trusting its workflow and root, with no
key; bad bundles are refused naming the identity found and wanted; threshold, rollback
and the warm path's cache trust count workflows as they count keys."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from exec_sandbox_assets.base.errors import ConfigError, RollbackError, SignatureError
from exec_sandbox_assets.client import AssetClient, cache_trust
from exec_sandbox_assets.config import Settings, load_settings
from exec_sandbox_assets.release import catalog, keyless, keys
from exec_sandbox_assets.release.keys import SigningKey
from exec_sandbox_assets.release.policy import TrustPolicy
from fake_source import FakeSource, MemoryRelease, make_release
from sigstore_instance import Flaw, SigstoreInstance

WORKFLOW = "https://github.com/acme/assets/.github/workflows/release.yml"
JAN, FEB = "2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"
KERNEL = catalog.kernel("x86_64")
INITRAMFS = catalog.initramfs("x86_64")


def keyless_release(
    instance: SigstoreInstance,
    version: str = "1.0.0",
    created: str = JAN,
    *,
    ref: str | None = None,
    flaw: Flaw | None = None,
) -> tuple[MemoryRelease, bytes]:
    release = make_release(version, created)
    statement = keyless.statement(release.digest, version, created)
    bundle = instance.bundle(
        statement, workflow_ref=ref or f"{WORKFLOW}@refs/tags/v{version}", flaw=flaw
    )
    return release, bundle


def client(tmp_path: Path, source: FakeSource, root: Path, **settings: object) -> AssetClient:
    values: dict[str, object] = {
        "cache_dir": tmp_path / "cache",
        "local_build_dir": None,
        "gvproxy_build_dir": None,
        "version": "1.0.0",
        "trusted_workflows": (WORKFLOW,),
        "sigstore_root": root,
        "host_os": "linux",
        "host_goarch": "amd64",
    }
    values.update(settings)
    return AssetClient(Settings(**values), sources=lambda _settings: [source])  # type: ignore[arg-type]


def fetch(c: AssetClient, spec: catalog.AssetSpec = KERNEL) -> dict[str, Path]:
    return asyncio.run(c.fetch((spec,)))


def test_a_keyless_release_is_accepted_with_no_key(
    tmp_path: Path, sigstore_test_instance: SigstoreInstance, sigstore_root: Path
) -> None:
    release, bundle = keyless_release(sigstore_test_instance)
    source = FakeSource("registry").add(release).add_bundle(release.digest, bundle)
    c = client(tmp_path, source, sigstore_root)
    paths = fetch(c)
    assert paths[KERNEL.output_name].read_bytes() == release.contents[KERNEL.output_name]
    # No key is trusted: the key signature is never asked for.
    # The platform manifest comes alongside the bundles (issue 18): requests 2 and 3.
    assert source.requests[0] == "tag v1.0.0"
    assert f"bundles of {release.digest}" in source.requests[1:3]
    assert not [r for r in source.requests if r.startswith("signature")], source.requests

    # The cache record names the workflow and the root: the warm path serves it with no
    # network and no sigstore import, until the root changes.
    source.down = True
    assert fetch(client(tmp_path, source, sigstore_root)) == paths
    other_root = SigstoreInstance.create("rotated").write_root(tmp_path / "rotated.json")
    with pytest.raises(Exception, match="unreachable"):
        fetch(client(tmp_path, source, other_root))


def test_one_good_bundle_among_bad_ones_is_enough(
    tmp_path: Path, sigstore_test_instance: SigstoreInstance, sigstore_root: Path
) -> None:
    release, good = keyless_release(sigstore_test_instance)
    statement = keyless.statement(release.digest, "1.0.0", JAN)
    source = FakeSource("registry").add(release)
    source.add_bundle(
        release.digest,
        sigstore_test_instance.bundle(statement, workflow_ref=f"{WORKFLOW}@refs/heads/main"),
    )
    source.add_bundle(release.digest, b"not json")
    source.add_bundle(
        release.digest,
        SigstoreInstance.create("evil").bundle(
            statement, workflow_ref=f"{WORKFLOW}@refs/tags/v1.0.0"
        ),
    )
    source.add_bundle(release.digest, good)
    assert fetch(client(tmp_path, source, sigstore_root))


@pytest.mark.parametrize(
    ("ref", "flaw", "reason"),
    [
        (f"{WORKFLOW}@refs/heads/main", None, "not the trusted workflow at the release's tag"),
        (
            "https://github.com/evil/assets/.github/workflows/release.yml@refs/tags/v1.0.0",
            None,
            "source repository https://github.com/evil/assets",
        ),
        (f"{WORKFLOW}@refs/tags/v1.0.0", Flaw.CHECKPOINT, "checkpoint: invalid signature"),
        (f"{WORKFLOW}@refs/tags/v1.0.0", Flaw.EXPIRED, "not valid at validation time"),
    ],
)
def test_a_bad_bundle_is_refused_in_one_line_naming_both_identities(
    tmp_path: Path,
    sigstore_test_instance: SigstoreInstance,
    sigstore_root: Path,
    ref: str,
    flaw: Flaw | None,
    reason: str,
) -> None:
    release, bundle = keyless_release(sigstore_test_instance, ref=ref, flaw=flaw)
    source = FakeSource("registry").add(release).add_bundle(release.digest, bundle)
    with pytest.raises(SignatureError) as info:
        fetch(client(tmp_path, source, sigstore_root))
    text = str(info.value)
    assert "\n" not in text
    assert f"signed by {ref} (issuer https://token.actions.githubusercontent.com)" in text
    assert f"wanted {WORKFLOW}@refs/tags/v1.0.0" in text
    assert reason in text
    assert not (tmp_path / "cache" / "v1.0.0").exists() or not any(
        (tmp_path / "cache" / "v1.0.0").glob("vmlinux*")
    )


def test_a_floating_tag_takes_the_signed_version_of_a_release_tag(
    tmp_path: Path, sigstore_test_instance: SigstoreInstance, sigstore_root: Path
) -> None:
    jan, jan_bundle = keyless_release(sigstore_test_instance, "1.0.0", JAN)
    feb, feb_bundle = keyless_release(sigstore_test_instance, "2.0.0", FEB)
    source = FakeSource("registry").add(feb, "latest").add_bundle(feb.digest, feb_bundle)
    assert fetch(client(tmp_path, source, sigstore_root, version="latest"))
    # The tag moves back to an older (validly signed) release: refused on its signed time.
    source.add(jan, "latest").add_bundle(jan.digest, jan_bundle)
    with pytest.raises(RollbackError, match="older than the release accepted before"):
        fetch(client(tmp_path, source, sigstore_root, version="latest"), INITRAMFS)


def test_threshold_counts_keys_and_workflows(
    tmp_path: Path, sigstore_test_instance: SigstoreInstance, sigstore_root: Path
) -> None:
    key: SigningKey = keys.generate_key()
    key_file = tmp_path / "release.pub"
    key_file.write_bytes(key.public.pem())
    release, bundle = keyless_release(sigstore_test_instance)
    both = release.signed([key])
    only_key = FakeSource("key").add(both)
    with pytest.raises(
        SignatureError, match=re.escape("1 trusted key(s) and 0 trusted workflow(s), 2 required")
    ):
        fetch(
            client(tmp_path / "a", only_key, sigstore_root, trusted_keys=(key_file,), threshold=2)
        )
    signed_twice = FakeSource("both").add(both).add_bundle(release.digest, bundle)
    assert fetch(
        client(tmp_path / "b", signed_twice, sigstore_root, trusted_keys=(key_file,), threshold=2)
    )
    with pytest.raises(ConfigError, match="exceeds the 2 distinct trusted key"):
        TrustPolicy(keys=(key.public,), threshold=3, workflows=(keyless.Workflow(WORKFLOW),))


def test_a_key_and_a_workflow_must_describe_the_same_release(
    tmp_path: Path, sigstore_test_instance: SigstoreInstance, sigstore_root: Path
) -> None:
    key: SigningKey = keys.generate_key()
    key_file = tmp_path / "release.pub"
    key_file.write_bytes(key.public.pem())
    release = make_release("1.0.0", JAN)
    # The workflow signed another creation time than the key did.
    bundle = sigstore_test_instance.bundle(
        keyless.statement(release.digest, "1.0.0", FEB),
        workflow_ref=f"{WORKFLOW}@refs/tags/v1.0.0",
    )
    source = FakeSource("both").add(release.signed([key])).add_bundle(release.digest, bundle)
    with pytest.raises(SignatureError, match="disagree on the release they describe"):
        fetch(client(tmp_path, source, sigstore_root, trusted_keys=(key_file,), threshold=2))


def test_a_workflow_no_longer_trusted_admits_no_cached_file(
    tmp_path: Path, sigstore_test_instance: SigstoreInstance, sigstore_root: Path
) -> None:
    release, bundle = keyless_release(sigstore_test_instance)
    source = FakeSource("registry").add(release).add_bundle(release.digest, bundle)
    fetch(client(tmp_path, source, sigstore_root))
    source.down = True
    other = "https://github.com/acme/assets/.github/workflows/other.yml"
    with pytest.raises(Exception, match="unreachable"):
        fetch(client(tmp_path, source, sigstore_root, trusted_workflows=(other,)))


def test_settings_for_keyless_trust(tmp_path: Path) -> None:
    default = load_settings({}, cache_dir=tmp_path)
    assert default.trusted_workflows == (keyless.DEFAULT_TRUSTED_WORKFLOW,)
    assert default.sigstore_root is None
    env = {
        "EXEC_SANDBOX_TRUSTED_WORKFLOWS": f"{WORKFLOW}, https://github.com/o/r/.github/workflows/x.yaml",
        "EXEC_SANDBOX_SIGSTORE_ROOT": str(tmp_path / "root.json"),
    }
    configured = load_settings(env, cache_dir=tmp_path)
    assert configured.trusted_workflows == (
        WORKFLOW,
        "https://github.com/o/r/.github/workflows/x.yaml",
    )
    assert configured.sigstore_root == tmp_path / "root.json"
    assert (
        load_settings({"EXEC_SANDBOX_TRUSTED_WORKFLOWS": ""}, cache_dir=tmp_path).trusted_workflows
        == ()
    )
    # Explicit arguments win over the environment.
    assert load_settings(env, cache_dir=tmp_path, trusted_workflows=[]).trusted_workflows == ()
    with pytest.raises(ConfigError, match="names a ref"):
        load_settings(
            {"EXEC_SANDBOX_TRUSTED_WORKFLOWS": f"{WORKFLOW}@refs/heads/main"}, cache_dir=tmp_path
        )
    # The warm path's trust names each workflow under the root's fingerprint.
    trust = cache_trust(configured.with_(sigstore_root=keyless.VENDORED_ROOT))
    fingerprint = keyless.root_fingerprint(keyless.VENDORED_ROOT)
    assert keyless.trust_id(keyless.Workflow(WORKFLOW), fingerprint) in trust.key_ids
