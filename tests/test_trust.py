"""Pure tests of trust.py: keys, payloads, signature manifests, verification policy."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, utils

from exec_sandbox_assets.base.errors import (
    ConfigError,
    FormatError,
    NoTrustedKeysError,
    RollbackError,
    SignatureError,
    VersionMismatchError,
)
from exec_sandbox_assets.oci.model import (
    MEDIA_TYPE_IMAGE_CONFIG,
    Descriptor,
    Manifest,
    sha256_digest,
)
from exec_sandbox_assets.release import keys, policy, signing

DIGEST = "sha256:" + "ab" * 32
OTHER_DIGEST = "sha256:" + "cd" * 32
REF = "ghcr.io/dualeai/exec-sandbox-assets"
CREATED = "2026-11-26T00:00:00Z"


def _policy(
    *keys: keys.SigningKey, threshold: int = 1, allow_downgrade: bool = False
) -> policy.TrustPolicy:
    return policy.TrustPolicy(tuple(k.public for k in keys), threshold, allow_downgrade)


def _signed(
    key: keys.SigningKey,
    digest: str = DIGEST,
    version: str | None = "0.22.0",
    created: str | None = CREATED,
) -> tuple[bytes, bytes]:
    payload = signing.make_payload(digest, REF, version, created)
    return payload, key.sign(payload)


def _verify(
    trust_policy: policy.TrustPolicy,
    signatures: Sequence[tuple[bytes, bytes]],
    *,
    digest: str = DIGEST,
    expected_version: str | None = None,
    newest: str | None = None,
) -> policy.VerifiedRelease:
    return policy.verify_index(
        trust_policy,
        digest,
        signatures,
        expected_version=expected_version,
        newest_accepted_created=newest,
        where="test-registry",
    )


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("algorithm", keys.ALGORITHMS)
def test_round_trip_through_signature_manifest(algorithm: str) -> None:
    key = keys.generate_key(algorithm)
    assert key.public.algorithm == algorithm
    sig = signing.sign_index([key], DIGEST, REF, "0.22.0", CREATED)

    layers = signing.read_signature_manifest(sig.manifest, "sig")
    assert len(layers) == 1 == len(sig.payloads)
    assert layers[0].payload_digest == sha256_digest(sig.payloads[0])
    assert layers[0].payload_size == len(sig.payloads[0])

    # The verifier trusts the key as loaded from its PEM, like a client would.
    public = keys.load_public_key(key.public.pem(), "key.pub")
    assert public.key_id == key.public.key_id
    assert public == key.public
    release = _verify(
        policy.TrustPolicy((public,)),
        [(sig.payloads[0], layers[0].signature)],
        expected_version="0.22.0",
    )
    assert release == policy.VerifiedRelease(DIGEST, "0.22.0", CREATED, (public.key_id,))


def test_key_id_is_sha256_of_der_spki() -> None:
    key = keys.generate_key()
    der = key.public.key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert key.public.key_id == hashlib.sha256(der).hexdigest()
    assert key.public.pem().startswith(b"-----BEGIN PUBLIC KEY-----")


def test_generate_unknown_algorithm() -> None:
    with pytest.raises(ConfigError, match="rsa"):
        keys.generate_key("rsa")


def test_rotation_signs_one_payload_with_each_key() -> None:
    old, new = keys.generate_key(), keys.generate_key("ed25519")
    sig = signing.sign_index([old, new, old], DIGEST, REF, "1.0.0", CREATED)
    layers = signing.read_signature_manifest(sig.manifest, "sig")
    assert len(layers) == 2  # the duplicate key signs once
    assert sig.payloads[0] == sig.payloads[1]
    pairs = list(zip(sig.payloads, (layer.signature for layer in layers), strict=True))
    for key in (old, new):  # a client trusting either key accepts the release
        assert _verify(_policy(key), pairs).key_ids == (key.public.key_id,)
    assert _verify(_policy(old, new, threshold=2), pairs).key_ids == (
        old.public.key_id,
        new.public.key_id,
    )


def test_sign_index_needs_a_key() -> None:
    with pytest.raises(ConfigError):
        signing.sign_index([], DIGEST, REF, None, None)


# ------------------------------------------------------------------ payload format


def test_payload_bytes_exactly_as_spec() -> None:
    payload = signing.make_payload(DIGEST, REF, "0.22.0", CREATED)
    assert payload == (
        b'{"critical":{"identity":{"docker-reference":"ghcr.io/dualeai/exec-sandbox-assets"},'
        b'"image":{"docker-manifest-digest":"sha256:'
        + b"ab"
        * 32
        + b'"},"type":"cosign container image signature"},'
        b'"optional":{"dev.exec-sandbox.version":"0.22.0",'
        b'"dev.exec-sandbox.created":"2026-11-26T00:00:00Z"}}'
    )
    parsed = signing.parse_payload(payload, "p")
    assert parsed == signing.SignedPayload(DIGEST, REF, "0.22.0", CREATED, payload)


def test_payload_optional_keys_only_when_given() -> None:
    only_version = signing.make_payload(DIGEST, REF, "1.0", None)
    assert only_version.endswith(b'"optional":{"dev.exec-sandbox.version":"1.0"}}')
    # Exactly what `cosign sign` writes when there are no annotations.
    bare = signing.make_payload(DIGEST, REF, None, None)
    assert bare.endswith(b'"type":"cosign container image signature"},"optional":null}')
    parsed = signing.parse_payload(bare, "p")
    assert (parsed.version, parsed.created) == (None, None)


def test_make_payload_rejects_bad_inputs() -> None:
    with pytest.raises(ConfigError, match="digest"):
        signing.make_payload("sha256:nothex", REF, None, None)
    with pytest.raises(ConfigError, match="RFC 3339"):
        signing.make_payload(DIGEST, REF, None, "yesterday")


def _payload_doc(**critical: object) -> dict[str, object]:
    base: dict[str, object] = {
        "identity": {"docker-reference": REF},
        "image": {"docker-manifest-digest": DIGEST},
        "type": signing.PAYLOAD_TYPE,
    }
    base.update(critical)
    return {"critical": base, "optional": None}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not json", "not valid JSON"),
        (b"[]", "expected a JSON object"),
        (json.dumps(_payload_doc(type="atomic container signature")).encode(), "type"),
        (json.dumps(_payload_doc(image={})).encode(), "docker-manifest-digest"),
        (
            json.dumps(_payload_doc(image={"docker-manifest-digest": 5})).encode(),
            "invalid digest",
        ),
        (json.dumps(_payload_doc(identity={"docker-reference": 1})).encode(), "string"),
        (
            json.dumps(
                {**_payload_doc(), "optional": {signing.OPT_VERSION: 22}},
            ).encode(),
            "must be a string",
        ),
        (
            json.dumps({**_payload_doc(), "optional": {signing.OPT_CREATED: "soon"}}).encode(),
            "RFC 3339",
        ),
        (
            b'{"critical":{"identity":{"docker-reference":"r"},"image":'
            b'{"docker-manifest-digest":"' + DIGEST.encode() + b'","docker-manifest-digest":"'
            b"" + OTHER_DIGEST.encode() + b'"},"type":"cosign container image signature"}}',
            "duplicate",
        ),
    ],
)
def test_parse_payload_rejects_malformed(data: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message) as info:
        signing.parse_payload(data, "payload-0")
    assert info.value.where == "payload-0"


# ------------------------------------------------------------------ verification failures


def test_fails_with_another_key() -> None:
    signer, trusted = keys.generate_key(), keys.generate_key()
    with pytest.raises(SignatureError) as info:
        _verify(_policy(trusted), [_signed(signer)])
    text = str(info.value)
    assert "test-registry" in text and DIGEST in text
    assert "0 trusted key(s), 1 required" in text
    assert trusted.public.key_id[:16] in text and "generated" in text


@pytest.mark.parametrize("algorithm", keys.ALGORITHMS)
def test_fails_with_changed_payload_byte(algorithm: str) -> None:
    key = keys.generate_key(algorithm)
    payload, signature = _signed(key)
    tampered = payload.replace(b"0.22.0", b"0.22.1")
    assert tampered != payload
    with pytest.raises(SignatureError):
        _verify(_policy(key), [(tampered, signature)])


def test_fails_with_payload_for_another_digest() -> None:
    key = keys.generate_key()
    with pytest.raises(SignatureError, match="another digest"):
        _verify(_policy(key), [_signed(key, digest=OTHER_DIGEST)])


def test_untrusted_key_on_this_digest_plus_trusted_key_on_another_is_refused() -> None:
    trusted, untrusted = keys.generate_key(), keys.generate_key()
    # Pairs are verified as pairs: the trusted signature cannot lend its validity to the
    # untrusted key's payload that names the right digest.
    forged_payload, forged_sig = _signed(untrusted)
    other_payload, other_sig = _signed(trusted, digest=OTHER_DIGEST)
    mixes = [
        [(forged_payload, forged_sig), (other_payload, other_sig)],
        [(forged_payload, other_sig), (other_payload, forged_sig)],
    ]
    for signatures in mixes:
        with pytest.raises(SignatureError, match="0 trusted key"):
            _verify(_policy(trusted), signatures)


def test_signature_manifest_with_too_many_layers_is_refused() -> None:
    key = keys.generate_key()
    payload, signature = _signed(key)
    many = signing.build_signature_manifest([(payload, signature)] * 5000).manifest
    with pytest.raises(SignatureError, match="5000 signature layers") as info:
        signing.read_signature_manifest(many, "mirror sig")
    assert "mirror sig" in str(info.value)
    few = signing.build_signature_manifest([(payload, signature)] * 3).manifest
    assert len(signing.read_signature_manifest(few, "sig")) == 3


def test_deeply_nested_json_is_a_format_error() -> None:
    depth = 20_000  # far past the interpreter's recursion limit, under the payload cap
    nested = b'{"schemaVersion":2,"layers":[],"config":' + b"[" * depth + b"]" * depth + b"}"
    with pytest.raises(FormatError, match="sig"):
        signing.read_signature_manifest(nested, "sig")
    with pytest.raises(FormatError, match="payload is not valid JSON"):
        signing.parse_payload(b'{"critical":' + b"[" * depth + b"]" * depth + b"}", "payload")


@pytest.mark.parametrize("algorithm", keys.ALGORITHMS)
def test_fails_with_truncated_or_garbage_signature(algorithm: str) -> None:
    key = keys.generate_key(algorithm)
    payload, signature = _signed(key)
    for bad in (signature[:-1], signature[:10], b"", b"\x00" * len(signature), b"garbage"):
        assert not key.public.verify(bad, payload)
        with pytest.raises(SignatureError):
            _verify(_policy(key), [(payload, bad)])


def test_signed_but_unparsable_payload_counts_for_nothing() -> None:
    key = keys.generate_key()
    junk = b'{"critical":{}}'
    with pytest.raises(SignatureError):
        _verify(_policy(key), [(junk, key.sign(junk))])


def test_one_good_signature_among_bad_ones_is_enough() -> None:
    key, stranger = keys.generate_key(), keys.generate_key()
    payload, signature = _signed(key)
    release = _verify(
        _policy(key),
        [
            (payload, b"junk"),
            _signed(stranger),
            _signed(key, digest=OTHER_DIGEST),
            (payload, signature),
        ],
    )
    assert release.key_ids == (key.public.key_id,)


# ------------------------------------------------------------------ threshold


def test_threshold_two_with_two_keys() -> None:
    a, b = keys.generate_key(), keys.generate_key("ed25519")
    release = _verify(_policy(a, b, threshold=2), [_signed(a), _signed(b)])
    assert set(release.key_ids) == {a.public.key_id, b.public.key_id}


def test_threshold_two_with_one_valid_signature() -> None:
    a, b = keys.generate_key(), keys.generate_key()
    with pytest.raises(SignatureError, match="1 trusted key\\(s\\), 2 required"):
        _verify(_policy(a, b, threshold=2), [_signed(a), (_signed(b)[0], b"bad")])


def test_same_key_twice_counts_once() -> None:
    a, b = keys.generate_key(), keys.generate_key()
    with pytest.raises(SignatureError, match="1 trusted key"):
        _verify(_policy(a, b, threshold=2), [_signed(a), _signed(a)])
    # Listing one key twice in the policy does not make it two keys either.
    with pytest.raises(ConfigError, match="exceeds"):
        _policy(a, a, threshold=2)


@pytest.mark.parametrize("threshold", [0, -1, 3])
def test_threshold_out_of_range(threshold: int) -> None:
    a, b = keys.generate_key(), keys.generate_key()
    with pytest.raises(ConfigError, match="threshold"):
        _policy(a, b, threshold=threshold)


def test_disagreeing_valid_signatures_are_refused() -> None:
    a, b = keys.generate_key(), keys.generate_key()
    with pytest.raises(SignatureError, match="disagree"):
        _verify(_policy(a, b), [_signed(a, version="1.0.0"), _signed(b, version="2.0.0")])


# ------------------------------------------------------------------ version and rollback


def test_version_mismatch() -> None:
    key = keys.generate_key()
    with pytest.raises(VersionMismatchError) as info:
        _verify(_policy(key), [_signed(key, version="0.21.0")], expected_version="0.22.0")
    assert "0.21.0" in str(info.value) and "0.22.0" in str(info.value)
    with pytest.raises(VersionMismatchError):
        _verify(_policy(key), [_signed(key, version=None)], expected_version="0.22.0")


def test_version_leading_v_is_ignored() -> None:
    key = keys.generate_key()
    assert _verify(_policy(key), [_signed(key)], expected_version="v0.22.0").version == "0.22.0"
    assert _verify(_policy(key), [_signed(key, version="v0.22.0")], expected_version="0.22.0")


def test_rollback_refused() -> None:
    key = keys.generate_key()
    with pytest.raises(RollbackError) as info:
        _verify(_policy(key), [_signed(key)], newest="2026-12-01T00:00:00Z")
    text = str(info.value)
    assert CREATED in text and "2026-12-01T00:00:00Z" in text and "allow_downgrade" in text


def test_rollback_allowed_with_allow_downgrade() -> None:
    key = keys.generate_key()
    policy = _policy(key, allow_downgrade=True)
    assert _verify(policy, [_signed(key)], newest="2026-12-01T00:00:00Z").created == CREATED


def test_same_or_newer_release_is_not_a_rollback() -> None:
    key = keys.generate_key()
    for newest in (CREATED, "2026-11-26T00:00:00+00:00", "2026-11-26T01:00:00+02:00"):
        assert _verify(_policy(key), [_signed(key)], newest=newest).created == CREATED


def test_rollback_check_needs_a_signed_time() -> None:
    key = keys.generate_key()
    with pytest.raises(RollbackError, match="no signed creation time"):
        _verify(_policy(key), [_signed(key, created=None)], newest=CREATED)


def test_no_keys() -> None:
    key = keys.generate_key()
    with pytest.raises(NoTrustedKeysError) as info:
        _verify(policy.TrustPolicy(()), [_signed(key)])
    text = str(info.value)
    assert "EXEC_SANDBOX_TRUSTED_KEYS" in text
    assert "trusted_keys=" in text and "EXEC_SANDBOX_INSECURE_SKIP_VERIFY=1" in text


# ------------------------------------------------------------------ key files


@pytest.mark.parametrize("algorithm", keys.ALGORITHMS)
def test_encrypted_private_key(algorithm: str, tmp_path: Path) -> None:
    key = keys.generate_key(algorithm)
    path = tmp_path / "cosign.key"
    path.write_bytes(key.private_pem(b"s3cret"))
    assert b"ENCRYPTED PRIVATE KEY" in path.read_bytes()

    loaded = keys.load_signing_key_file(path, b"s3cret")
    assert loaded.public.key_id == key.public.key_id
    assert key.public.verify(loaded.sign(b"data"), b"data")

    for password in (None, b""):
        with pytest.raises(ConfigError, match="password is required") as info:
            keys.load_signing_key_file(path, password)
        assert str(path) in str(info.value)
    with pytest.raises(ConfigError, match="wrong password") as info:
        keys.load_signing_key_file(path, b"wrong")
    assert str(path) in str(info.value)


def test_unencrypted_and_sec1_private_keys() -> None:
    key = keys.generate_key()
    plain = key.private_pem(None)
    assert b"BEGIN PRIVATE KEY" in plain
    assert keys.load_signing_key(plain, "k", None).public == key.public
    assert keys.load_signing_key(plain, "k", b"ignored").public == key.public
    sec1 = key.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    assert b"BEGIN EC PRIVATE KEY" in sec1
    assert keys.load_signing_key(sec1, "k", None).public == key.public


def test_public_key_where_private_expected(tmp_path: Path) -> None:
    path = tmp_path / "cosign.pub"
    path.write_bytes(keys.generate_key().public.pem())
    with pytest.raises(ConfigError, match="public key") as info:
        keys.load_signing_key_file(path, None)
    assert str(path) in str(info.value)


def test_private_key_where_public_expected(tmp_path: Path) -> None:
    path = tmp_path / "cosign.key"
    path.write_bytes(keys.generate_key().private_pem(None))
    with pytest.raises(ConfigError, match="private key") as info:
        keys.load_public_key_file(path)
    assert str(path) in str(info.value)


def test_cosign_native_private_key_format_is_explained() -> None:
    data = b"-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\nabc\n-----END ENCRYPTED SIGSTORE PRIVATE KEY-----\n"
    with pytest.raises(ConfigError, match="cosign's own"):
        keys.load_signing_key(data, "cosign.key", b"pw")


def _spki(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: rsa.generate_private_key(65537, 2048), "RSA key is not supported"),
        (lambda: ec.generate_private_key(ec.SECP384R1()), "curve secp384r1 is not supported"),
    ],
)
def test_unsupported_public_keys_refused(
    make: Callable[[], rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey],
    message: str,
    tmp_path: Path,
) -> None:
    path = tmp_path / "other.pub"
    path.write_bytes(_spki(make()))
    with pytest.raises(ConfigError, match=message) as info:
        keys.load_public_key_file(path)
    assert str(path) in str(info.value)


def test_unsupported_private_key_refused() -> None:
    pem = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ConfigError, match="secp384r1"):
        keys.load_signing_key(pem, "p384.key", None)


def test_garbage_and_missing_public_key_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pub"
    garbage.write_bytes(b"hello")
    with pytest.raises(ConfigError, match="no PEM block") as info:
        keys.load_public_key_file(garbage)
    assert str(garbage) in str(info.value)

    broken = tmp_path / "broken.pub"
    broken.write_bytes(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ConfigError, match="cannot parse") as info:
        keys.load_public_key_file(broken)
    assert str(broken) in str(info.value)

    missing = tmp_path / "missing.pub"
    with pytest.raises(ConfigError, match="cannot read") as info:
        keys.load_public_key_file(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(ConfigError, match="cannot read"):
        keys.load_public_key_file(tmp_path)  # a directory


def test_write_key_pair(tmp_path: Path) -> None:
    key = keys.generate_key()
    private, public = tmp_path / "release.key", tmp_path / "release.pub"
    keys.write_key_pair(key, private, public, b"pw")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert keys.load_signing_key_file(private, b"pw").public == key.public
    assert keys.load_public_key_file(public) == key.public
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release.key", "release.pub"]

    other = keys.generate_key()
    before = private.read_bytes(), public.read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        keys.write_key_pair(other, private, tmp_path / "new.pub", None)
    with pytest.raises(ConfigError, match="already exists"):
        keys.write_key_pair(other, tmp_path / "new.key", public, None)
    assert (private.read_bytes(), public.read_bytes()) == before
    assert not (tmp_path / "new.key").exists() and not (tmp_path / "new.pub").exists()


def test_write_key_pair_into_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match="nope"):
        keys.write_key_pair(keys.generate_key(), missing / "k", missing / "k.pub", None)


# ------------------------------------------------------------------ interop with cosign's format


def test_interop_prehashed_ecdsa_der_signature() -> None:
    # cosign signs sha256(payload) with ECDSA and stores the ASN.1 DER signature;
    # produce one that way, independently of SigningKey.sign.
    private = ec.generate_private_key(ec.SECP256R1())
    public = keys.load_public_key(_spki(private), "cosign.pub")
    payload = signing.make_payload(DIGEST, REF, "0.22.0", CREATED)
    signature = private.sign(
        hashlib.sha256(payload).digest(), ec.ECDSA(utils.Prehashed(hashes.SHA256()))
    )
    utils.decode_dss_signature(signature)  # proves it is DER (r, s)
    manifest = Manifest(
        config=Descriptor.for_bytes(MEDIA_TYPE_IMAGE_CONFIG, b"{}"),
        layers=(
            Descriptor.for_bytes(
                signing.SIMPLESIGNING_MEDIA_TYPE,
                payload,
                {signing.SIGNATURE_ANNOTATION: base64.b64encode(signature).decode()},
            ),
        ),
    ).to_bytes()
    (layer,) = signing.read_signature_manifest(manifest, "sig")
    release = _verify(policy.TrustPolicy((public,)), [(payload, layer.signature)])
    assert release.key_ids == (public.key_id,)


def test_interop_openssl_signature(tmp_path: Path) -> None:
    # An independent implementation: `openssl dgst -sha256 -sign` is what cosign's
    # format amounts to for an ECDSA P-256 key.
    key = keys.generate_key()
    (tmp_path / "k.pem").write_bytes(key.private_pem(None))
    payload = signing.make_payload(DIGEST, REF, None, None)
    (tmp_path / "payload").write_bytes(payload)
    signature = subprocess.run(
        ["openssl", "dgst", "-sha256", "-sign", str(tmp_path / "k.pem"), str(tmp_path / "payload")],
        check=True,
        capture_output=True,
    ).stdout
    assert _verify(_policy(key), [(payload, signature)]).version is None


# ------------------------------------------------------------------ signature manifests


def test_build_signature_manifest_layout() -> None:
    key = keys.generate_key()
    p1, p2 = b'{"a":1}', b'{"b":2}'
    sig = signing.build_signature_manifest([(p1, key.sign(p1)), (p2, b"\x01\x02")])
    manifest = Manifest.from_bytes(sig.manifest, "m")
    assert manifest.to_bytes() == sig.manifest
    assert manifest.config == Descriptor.for_bytes(MEDIA_TYPE_IMAGE_CONFIG, sig.config)
    assert json.loads(sig.config) == {
        "architecture": "",
        "os": "",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [sha256_digest(p1), sha256_digest(p2)]},
    }
    assert [layer.media_type for layer in manifest.layers] == [signing.SIMPLESIGNING_MEDIA_TYPE] * 2
    assert manifest.layers[1].annotations == {signing.SIGNATURE_ANNOTATION: "AQI="}
    assert sig.payloads == (p1, p2)
    with pytest.raises(ConfigError):
        signing.build_signature_manifest([])


def test_read_signature_manifest_skips_foreign_and_bad_layers() -> None:
    key = keys.generate_key()
    payload, signature = _signed(key)
    good = Descriptor.for_bytes(
        signing.SIMPLESIGNING_MEDIA_TYPE,
        payload,
        {signing.SIGNATURE_ANNOTATION: base64.b64encode(signature).decode()},
    )
    foreign = Descriptor.for_bytes(
        "application/vnd.dev.sigstore.bundle.v0.3+json",
        b"bundle",
        {signing.SIGNATURE_ANNOTATION: base64.b64encode(b"x").decode()},
    )
    bad_base64 = Descriptor.for_bytes(
        signing.SIMPLESIGNING_MEDIA_TYPE, b"other", {signing.SIGNATURE_ANNOTATION: "!!not base64!!"}
    )
    no_annotation = Descriptor.for_bytes(signing.SIMPLESIGNING_MEDIA_TYPE, b"bare")
    manifest = Manifest(
        config=Descriptor.for_bytes(MEDIA_TYPE_IMAGE_CONFIG, b"{}"),
        layers=(foreign, bad_base64, no_annotation, good),
    ).to_bytes()
    layers = signing.read_signature_manifest(manifest, "sig")
    assert layers == (signing.SignatureLayer(good.digest, good.size, signature),)
    assert _verify(_policy(key), [(payload, layers[0].signature)]).key_ids


def test_read_signature_manifest_rejects_non_manifest() -> None:
    with pytest.raises(FormatError):
        signing.read_signature_manifest(b'{"schemaVersion":2,"manifests":[]}', "sig")
