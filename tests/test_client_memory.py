"""The client's decisions, in memory: failover, not-found, rollback across sources,
version binding, threshold, unsigned and misdirected signatures, through `AssetClient`
on `FakeSource`s (tests/fake_source.py) and the pure policy. No server."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pytest

from exec_sandbox_assets.base.errors import (
    AllSourcesFailedError,
    AssetNotFoundError,
    ConfigError,
    FormatError,
    NoTrustedKeysError,
    ReleaseNotFoundError,
    RollbackError,
    SignatureError,
    VersionMismatchError,
)
from exec_sandbox_assets.client import AssetClient
from exec_sandbox_assets.config import Settings
from exec_sandbox_assets.oci.model import sha256_digest
from exec_sandbox_assets.release import catalog, keys, policy, signing
from exec_sandbox_assets.release.keyless import DEFAULT_TRUSTED_WORKFLOW
from exec_sandbox_assets.release.keys import SigningKey
from exec_sandbox_assets.release.policy import RollbackState
from exec_sandbox_assets.release.version import Version, normalize_version, version_of_tag
from exec_sandbox_assets.sources import Source
from exec_sandbox_assets.sources.reader import ReleaseReader
from exec_sandbox_assets.sources.report import examine
from fake_source import FakeSource, MemoryRelease, make_release

KERNEL = catalog.kernel("x86_64")
INITRAMFS = catalog.initramfs("x86_64")
JAN = "2026-01-01T00:00:00Z"
FEB = "2026-02-01T00:00:00Z"


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return keys.generate_key()


def _key_file(tmp_path: Path, key: SigningKey) -> Path:
    directory = tmp_path / "keys"
    directory.mkdir(parents=True, exist_ok=True)
    name = key.public.key_id[:16]
    path = directory / f"{name}.pub"
    if not path.exists():
        keys.write_key_pair(key, directory / f"{name}.key", path, None)
    return path


def client(
    tmp_path: Path,
    sources: Sequence[Source],
    trusted: Sequence[SigningKey],
    **settings: object,
) -> AssetClient:
    values: dict[str, object] = {
        "cache_dir": tmp_path / "cache",
        "local_build_dir": None,
        "gvproxy_build_dir": None,
        "version": "1.0.0",
        "trusted_keys": tuple(_key_file(tmp_path, k) for k in trusted),
        "host_os": "linux",
        "host_goarch": "amd64",
    }
    values.update(settings)
    return AssetClient(Settings(**values), sources=lambda _settings: list(sources))  # type: ignore[arg-type]


def fetch(c: AssetClient, *specs: catalog.AssetSpec) -> dict[str, Path]:
    return asyncio.run(c.fetch(specs or (KERNEL,)))


def assert_holds(release: MemoryRelease, paths: dict[str, Path]) -> None:
    for name, path in paths.items():
        assert path.read_bytes() == release.contents[name], name


# --------------------------------------------------------------------------- failover


def test_an_unreachable_source_fails_over_and_the_log_says_which_and_why(
    tmp_path: Path, key: SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    release = make_release("1.0.0", JAN, [key])
    down, good = FakeSource("mirror"), FakeSource("default").add(release)
    down.down = True

    with caplog.at_level(logging.WARNING):
        paths = fetch(client(tmp_path, [down, good], [key]), KERNEL, INITRAMFS)

    assert_holds(release, paths)
    # The reason is in the message itself, visible with a plain logging setup.
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("memory mirror" in m and "unreachable" in m for m in messages), messages


def test_a_version_no_source_has_is_not_found_not_a_download_error(
    tmp_path: Path, key: SigningKey
) -> None:
    a, b = FakeSource("a"), FakeSource("b").add(make_release("1.0.0", JAN, [key]))

    with pytest.raises(ReleaseNotFoundError) as info:
        fetch(client(tmp_path, [a, b], [key], version="9.9.9"))

    assert isinstance(info.value, AssetNotFoundError)
    assert [x.source for x in info.value.attempts] == ["memory a", "memory b"]
    assert "release v9.9.9 for linux/amd64 not found on any source" in str(info.value)


def test_one_source_down_and_one_without_the_release_is_a_download_failure(
    tmp_path: Path, key: SigningKey
) -> None:
    down, empty = FakeSource("down"), FakeSource("empty")
    down.down = True

    with pytest.raises(AllSourcesFailedError) as info:
        fetch(client(tmp_path, [down, empty], [key]))

    assert not info.value.not_found
    assert not isinstance(info.value, AssetNotFoundError)


# --------------------------------------------------------------------------- rollback


def _two_sources(key: SigningKey) -> tuple[FakeSource, FakeSource, MemoryRelease, MemoryRelease]:
    old = make_release("1.0.0", JAN, [key])
    new = make_release("2.0.0", FEB, [key], size=5000)  # other contents than 1.0.0
    mirror = FakeSource("mirror").add(new, "v2.0.0", "latest")
    default = FakeSource("default").add(old, "v1.0.0", "latest")
    return mirror, default, old, new


def test_rollback_state_is_per_tag_across_sources(tmp_path: Path, key: SigningKey) -> None:
    mirror, default, old, new = _two_sources(key)
    first = client(tmp_path, [mirror, default], [key], version="latest")
    assert_holds(new, fetch(first, KERNEL))
    assert first.cached_version() == "2.0.0"

    # The mirror that served 2.0.0 goes down: the default's signed 1.0.0 is a rollback.
    mirror.down = True
    second = client(tmp_path, [mirror, default], [key], version="latest")
    with pytest.raises(RollbackError) as info:
        fetch(second, INITRAMFS)
    assert JAN in str(info.value) and FEB in str(info.value)
    assert second.cached_version() == "2.0.0"  # the cache's latest did not move back
    assert not (tmp_path / "cache" / "v1.0.0").exists()

    downgrade = client(tmp_path, [mirror, default], [key], version="latest", allow_downgrade=True)
    assert_holds(old, fetch(downgrade, INITRAMFS))
    assert downgrade.cached_version() == "1.0.0"


def test_the_per_source_state_of_older_clients_still_counts(
    tmp_path: Path, key: SigningKey
) -> None:
    _mirror, default, _old, _new = _two_sources(key)
    refs = tmp_path / "cache" / "refs"
    refs.mkdir(parents=True)
    (refs / f"trust-{default.key}.json").write_text(json.dumps({"created": FEB}))

    with pytest.raises(RollbackError):
        fetch(client(tmp_path, [default], [key], version="latest"))


def test_the_newer_release_from_another_source_is_accepted(tmp_path: Path, key: SigningKey) -> None:
    mirror, default, old, new = _two_sources(key)
    assert_holds(old, fetch(client(tmp_path, [default], [key], version="latest")))

    newer = client(tmp_path, [mirror, default], [key], version="latest")
    assert_holds(new, fetch(newer, INITRAMFS))
    assert newer.cached_version() == "2.0.0"
    state = json.loads((tmp_path / "cache" / "refs" / "trust-tag-latest.json").read_text())
    assert state == {
        "created": FEB,
        "digest": new.digest,
        "source": "memory mirror",
        "version": "2.0.0",
    }


# --------------------------------------------------------------------------- trust


def test_a_signed_release_under_another_release_tag_stops_without_failover(
    tmp_path: Path, key: SigningKey
) -> None:
    other = make_release("2.0.0", FEB, [key])
    liar = FakeSource("liar").add(other, "v1.0.0")
    honest = FakeSource("honest").add(make_release("1.0.0", JAN, [key]))

    with pytest.raises(VersionMismatchError, match=r"'1\.0\.0' was asked for"):
        fetch(client(tmp_path, [liar, honest], [key]))

    assert honest.requests == []  # a trust failure is not a reason to try the next source


def test_threshold_needs_distinct_trusted_signers(tmp_path: Path, key: SigningKey) -> None:
    second = keys.generate_key()
    one = FakeSource("one").add(make_release("1.0.0", JAN, [key]))
    with pytest.raises(SignatureError, match="1 trusted key"):
        fetch(client(tmp_path / "a", [one], [key, second], threshold=2))

    both = make_release("1.0.0", JAN, [key, second])
    paths = fetch(client(tmp_path / "b", [FakeSource("two").add(both)], [key, second], threshold=2))
    assert_holds(both, paths)


def test_unsigned_and_untrusted_releases_are_refused(tmp_path: Path, key: SigningKey) -> None:
    unsigned = FakeSource("unsigned").add(make_release("1.0.0", JAN))
    with pytest.raises(SignatureError, match="no signature for index"):
        fetch(client(tmp_path / "a", [unsigned], [key]))

    stranger = FakeSource("stranger").add(make_release("1.0.0", JAN, [keys.generate_key()]))
    with pytest.raises(SignatureError, match="0 trusted key"):
        fetch(client(tmp_path / "b", [stranger], [key]))


def test_a_valid_signature_over_another_digest_counts_for_nothing(
    tmp_path: Path, key: SigningKey
) -> None:
    release = make_release("1.0.0", JAN)
    elsewhere = make_release("1.0.0", FEB)
    source = FakeSource("mirror").add(release.signed([key], digest=elsewhere.digest))

    with pytest.raises(SignatureError, match=r"1 valid signature\(s\) were for another digest"):
        fetch(client(tmp_path, [source], [key]))


def test_insecure_skip_verify_accepts_unsigned_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    release = make_release("1.0.0", JAN)
    source = FakeSource("mirror").add(release)

    with caplog.at_level(logging.WARNING):
        paths = fetch(client(tmp_path, [source], [], insecure_skip_verify=True))

    assert_holds(release, paths)
    assert any("SIGNATURE VERIFICATION DISABLED" in r.getMessage() for r in caplog.records)


def test_report_mode_collects_findings_instead_of_raising(key: SigningKey) -> None:
    stranger = keys.generate_key()
    release = make_release("1.0.0", JAN, [stranger])
    reader = ReleaseReader(FakeSource("mirror").add(release), None)

    found = asyncio.run(examine(reader, "v1.0.0", [key.public], 1))

    assert found.verdict is None and found.signature_present
    assert "0 trusted key" in (found.error or "")
    assert [f.signed_by for f in found.signatures] == [()]
    trusted = asyncio.run(examine(reader, "v1.0.0", [stranger.public], 1))
    assert trusted.verdict is not None and trusted.verdict.version == "1.0.0"


# --------------------------------------------------------------------------- pure policy


def test_unverified_releases_are_still_bound_to_their_tag() -> None:
    with pytest.raises(VersionMismatchError, match=r"holds release 2\.0\.0, but 1\.0\.0"):
        policy.accept_index(
            None,
            tag="v1.0.0",
            index_digest="sha256:" + "0" * 64,
            signatures=(),
            annotations=lambda: {catalog.ANN_VERSION: "2.0.0", catalog.ANN_CREATED: JAN},
            where="test",
        )


def test_a_signed_version_that_is_no_valid_version_is_refused(key: SigningKey) -> None:
    release = make_release("1.0.0", JAN).signed([key], version="../../etc")
    assert release.signature is not None
    with pytest.raises(FormatError, match="not a valid version"):
        policy.accept_index(
            policy.TrustPolicy((key.public,)),
            tag="latest",
            index_digest=release.digest,
            signatures=[(release.signature.payloads[0], _signature_of(release))],
            annotations=lambda: {catalog.ANN_VERSION: "1.0.0"},
            where="test",
        )


def _signature_of(release: MemoryRelease) -> bytes:
    from exec_sandbox_assets.release.signing import read_signature_manifest

    assert release.signature is not None
    return read_signature_manifest(release.signature.manifest, "test")[0].signature


def test_rollback_state_reads_old_and_odd_files_and_never_moves_back() -> None:
    assert RollbackState.from_json(None) == RollbackState()
    assert RollbackState.from_json({"created": FEB, "version": 2}) == RollbackState(FEB)
    newest = RollbackState.newest([RollbackState(JAN), RollbackState(FEB), RollbackState()])
    assert newest.created == FEB
    assert RollbackState(FEB).after(RollbackState(JAN, "1.0.0")).created == FEB
    assert RollbackState(JAN).after(RollbackState(FEB, "2.0.0")).version == "2.0.0"
    assert RollbackState(JAN).after(RollbackState(None, "3.0.0")) == RollbackState(JAN)


def test_without_a_trusted_key_the_hint_names_every_way_to_configure_one(
    tmp_path: Path, key: SigningKey
) -> None:
    source = FakeSource("mirror").add(make_release("1.0.0", JAN, [key]))

    # Keyless trust switched off (EXEC_SANDBOX_TRUSTED_WORKFLOWS=""), and no key.
    with pytest.raises(NoTrustedKeysError) as info:
        fetch(client(tmp_path, [source], [], trusted_workflows=()))

    text = str(info.value)
    for way in (
        "EXEC_SANDBOX_TRUSTED_KEYS=",
        "--trusted-key FILE",
        "configure(trusted_keys=",
        "EXEC_SANDBOX_TRUSTED_WORKFLOWS=",
        "--trusted-workflow URL",
        "configure(trusted_workflows=",
    ):
        assert way in text
    assert source.requests == ["tag v1.0.0"]  # nothing beyond the index was fetched


def test_a_default_client_trusts_the_release_workflow_and_no_key(
    tmp_path: Path, key: SigningKey
) -> None:
    release = make_release("1.0.0", JAN, [key])
    source = FakeSource("mirror").add(release)

    with pytest.raises(SignatureError) as info:
        fetch(client(tmp_path, [source], []))

    text = str(info.value)
    assert "0 trusted key(s) and 0 trusted workflow(s), 1 required" in text
    assert f"trusted workflows: {DEFAULT_TRUSTED_WORKFLOW}" in text
    # No key is trusted: the key signature is not even fetched, only the bundles (the
    # platform manifest comes alongside, issue 18; nothing was installed).
    assert source.requests[0] == "tag v1.0.0"
    assert f"bundles of {release.digest}" in source.requests
    assert not [r for r in source.requests if r.startswith("signature")], source.requests
    assert not list((tmp_path / "cache").glob("v*"))


def test_index_bytes_are_parsed_only_after_a_trusted_key_vouched(
    tmp_path: Path, key: SigningKey
) -> None:
    source = FakeSource("hostile")
    source.tags["v1.0.0"] = b'{"schemaVersion": 2, "manifests": [' + b"[" * 5000

    # Unsigned garbage is refused for its missing signature, never parsed.
    with pytest.raises(SignatureError, match="no signature for index"):
        fetch(client(tmp_path, [source], [key]))

    # Signed by a key nobody trusts: refused as untrusted, still never parsed (parsing
    # first would end in a FormatError for the nesting instead).
    digest = sha256_digest(source.tags["v1.0.0"])
    stranger = keys.generate_key()
    source.sign(digest, signing.sign_index([stranger], digest, "r", "1.0.0", None))
    with pytest.raises(SignatureError, match="0 trusted key"):
        fetch(client(tmp_path, [source], [key]))


@pytest.mark.parametrize("text", ["-1.0", ".1", "1..2", "1.0+build", "a" * 128, "", "latest"])
def test_versions_no_tag_or_cache_directory_can_hold_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid version"):
        Version.parse(text)


def test_one_version_rule_for_settings_and_tags() -> None:
    assert Version.parse("v0.22.0") == Version("0.22.0") and Version("0.22.0").tag == "v0.22.0"
    assert normalize_version("") == normalize_version(" latest ") == "latest"
    assert (version_of_tag("v1.2"), version_of_tag("latest"), version_of_tag("vx")) == (
        "1.2",
        None,
        None,
    )
