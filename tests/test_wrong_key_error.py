"""A release refused for its signature names who signed it and whom we trust (issue #19
item 4): each new signature layer names its key (`dev.exec-sandbox.key-id`, an unsigned
claim: it words the error and never counts). Through the CLI on a published layout, and
the policy's wording for signatures that name no key or a trusted key they fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from exec_sandbox_assets.base.errors import SignatureError
from exec_sandbox_assets.release import keys, policy, signing
from exec_sandbox_assets.release.keys import load_public_key_file
from releases import make_key_pair, publish_sample_release
from test_cli import HOST, run

DIGEST = "sha256:" + "ab" * 32


def test_a_pull_refused_for_an_untrusted_key_names_the_key_that_signed(tmp_path: Path) -> None:
    signer = make_key_pair(tmp_path / "keys", "signer")
    trusted = make_key_pair(tmp_path / "keys", "trusted")
    release = publish_sample_release(
        f"oci:{tmp_path / 'layout'}", "1.0.0", tmp_path / "work", key=signer, platforms=[HOST]
    )
    signer_id = load_public_key_file(signer.public).key_id
    trusted_id = load_public_key_file(trusted.public).key_id

    result = run(
        "--cache-dir", tmp_path / "cache", "--mirror", release.target, "--airgap",
        "--trusted-key", trusted.public, "--asset-version", "1.0.0", "pull",
    )  # fmt: skip
    assert result.code == 3, result.stderr
    assert f"trusted keys tried: {trusted_id[:16]}" in result.stderr
    assert f"signed by key(s) {signer_id[:16]}, not trusted here" in result.stderr


def _verify(pairs: list[tuple[bytes, bytes]], trusted: keys.PublicKey, **kw: object) -> str:
    with pytest.raises(SignatureError) as info:
        policy.verify_index(
            policy.TrustPolicy(keys=(trusted,)),
            DIGEST,
            pairs,
            expected_version=None,
            newest_accepted_created=None,
            where="test",
            **kw,  # type: ignore[arg-type]
        )
    return str(info.value)


def test_the_policy_says_when_no_key_is_named_or_a_trusted_one_fails() -> None:
    trusted, stranger = keys.generate_key(), keys.generate_key()
    payload = signing.make_payload(DIGEST, "r", "1.0.0", None)
    by_stranger = stranger.sign(payload)
    # cosign (or an older publisher) names no key.
    assert "1 signature(s) name no key" in _verify([(payload, by_stranger)], trusted.public)
    # A layer claiming the trusted key whose signature does not verify with it.
    claimed = {by_stranger: trusted.public.key_id}
    message = _verify([(payload, by_stranger)], trusted.public, claimed_key_ids=claimed)
    assert f"naming trusted key(s) {trusted.public.key_id[:16]} does not verify" in message
    # What the publisher writes now: the layer names its key, read back as it was.
    manifest = signing.sign_index([stranger], DIGEST, "r", "1.0.0", None)
    (layer,) = signing.read_signature_manifest(manifest.manifest, "test")
    assert layer.key_id == stranger.public.key_id
