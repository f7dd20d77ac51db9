"""Keyless release signatures (release/keyless.py): bundles made by a private Sigstore
instance (tests/sigstore_instance.py) verified with sigstore-python, every refusal named
in one line; and real public bundles verified offline against the vendored root."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from exec_sandbox_assets.base.errors import ConfigError, SignatureError
from exec_sandbox_assets.release import keyless
from exec_sandbox_assets.release.keyless import Workflow
from sigstore_instance import Flaw, SigstoreInstance

WORKFLOW = "https://github.com/acme/assets/.github/workflows/release.yml"
DIGEST = "sha256:" + "ab" * 32
OTHER_DIGEST = "sha256:" + "cd" * 32
CREATED = "2026-01-01T00:00:00Z"
# ../shared/sigstore-vectors beside the checkout (a worktree's checkout may sit deeper).
VECTORS = next(
    (
        d / "shared" / "sigstore-vectors"
        for d in Path(__file__).resolve().parents
        if (d / "shared" / "sigstore-vectors").is_dir()
    ),
    Path(__file__).resolve().parents[2] / "shared" / "sigstore-vectors",
)


def _statement(version: str = "1.0.0", digest: str = DIGEST) -> bytes:
    return keyless.statement(digest, version, CREATED)


def _verify(
    bundle: bytes, root: Path, *, version: str | None = "1.0.0", workflow: str = WORKFLOW
) -> keyless.KeylessSignature:
    return keyless.verify_bundle(
        bundle,
        index_digest=DIGEST,
        version=version,
        workflows=[Workflow.parse(workflow)],
        trusted_root=root,
        where="test",
    )


def test_statement_is_cosign_shaped() -> None:
    doc = json.loads(_statement())
    assert doc == {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [
            {
                "digest": {"sha256": "ab" * 32},
                "annotations": {
                    "dev.exec-sandbox.version": "1.0.0",
                    "dev.exec-sandbox.created": CREATED,
                },
            }
        ],
        "predicateType": "https://sigstore.dev/cosign/sign/v1",
        "predicate": {},
    }
    with pytest.raises(ConfigError):
        keyless.statement("sha256:nope", "1.0.0", CREATED)


def test_accepted_at_the_release_tag(
    sigstore_test_instance: SigstoreInstance, sigstore_root: Path
) -> None:
    bundle = sigstore_test_instance.bundle(
        _statement(), workflow_ref=f"{WORKFLOW}@refs/tags/v1.0.0"
    )
    signed = _verify(bundle, sigstore_root)
    assert signed.identity == f"{WORKFLOW}@refs/tags/v1.0.0"
    assert (signed.version, signed.created, signed.workflow) == ("1.0.0", CREATED, WORKFLOW)
    assert signed.trust_id.startswith(f"sigstore:{WORKFLOW}#root=")
    # A floating tag (version unknown until signed): any v* tag whose version is signed.
    assert _verify(bundle, sigstore_root, version=None).version == "1.0.0"


@pytest.mark.parametrize(
    ("case", "ref", "kwargs", "version", "reason"),
    [
        ("branch", f"{WORKFLOW}@refs/heads/main", {}, "1.0.0", "not the trusted workflow"),
        ("branch, floating", f"{WORKFLOW}@refs/heads/main", {}, None, "v<version> tag"),
        (
            "another repository",
            "https://github.com/evil/assets/.github/workflows/release.yml@refs/tags/v1.0.0",
            {},
            "1.0.0",
            "source repository https://github.com/evil/assets",
        ),
        (
            "same SAN, another source repository",
            f"{WORKFLOW}@refs/tags/v1.0.0",
            {"repository": "https://github.com/evil/assets"},
            "1.0.0",
            "source repository https://github.com/evil/assets",
        ),
        (
            "another workflow",
            "https://github.com/acme/assets/.github/workflows/ci.yml@refs/tags/v1.0.0",
            {},
            "1.0.0",
            "not the trusted workflow",
        ),
        (
            "another issuer",
            f"{WORKFLOW}@refs/tags/v1.0.0",
            {"issuer": "https://gitlab.com"},
            "1.0.0",
            "issuer https://gitlab.com is not",
        ),
        ("another version", f"{WORKFLOW}@refs/tags/v1.0.1", {}, "1.0.0", "release's tag"),
        ("tag prefix", f"{WORKFLOW}@refs/tags/v1.0.0-evil", {}, "1.0.0", "release's tag"),
    ],
)
def test_refused_identity(
    sigstore_test_instance: SigstoreInstance,
    sigstore_root: Path,
    case: str,
    ref: str,
    kwargs: dict[str, Any],
    version: str | None,
    reason: str,
) -> None:
    bundle = sigstore_test_instance.bundle(_statement(), workflow_ref=ref, **kwargs)
    with pytest.raises(SignatureError) as caught:
        _verify(bundle, sigstore_root, version=version)
    message = str(caught.value)
    assert "\n" not in message
    assert f"signed by {ref} (issuer " in message, case
    wanted = f"{WORKFLOW}@refs/tags/{'v1.0.0' if version else 'v<version>'}"
    assert f"wanted {wanted}" in message
    assert reason in message


def test_refused_statement_of_another_release(
    sigstore_test_instance: SigstoreInstance, sigstore_root: Path
) -> None:
    ref = f"{WORKFLOW}@refs/tags/v1.0.0"
    other = sigstore_test_instance.bundle(_statement(digest=OTHER_DIGEST), workflow_ref=ref)
    with pytest.raises(SignatureError, match=f"statement is about {OTHER_DIGEST}, not index"):
        _verify(other, sigstore_root)
    # Signed at tag v1.0.0 of the workflow, but claiming 2.0.0: a floating tag must not
    # take the signed claim over the tag the workflow ran at.
    lying = sigstore_test_instance.bundle(_statement(version="2.0.0"), workflow_ref=ref)
    with pytest.raises(SignatureError, match=re.escape("signed version '2.0.0' is not the tag's")):
        _verify(lying, sigstore_root, version=None)
    doc = json.loads(_statement())
    doc["predicateType"] = "https://slsa.dev/provenance/v1"
    slsa = sigstore_test_instance.bundle(json.dumps(doc).encode(), workflow_ref=ref)
    with pytest.raises(
        SignatureError, match=re.escape("predicate type https://slsa.dev/provenance/v1")
    ):
        _verify(slsa, sigstore_root)
    plain = sigstore_test_instance.bundle(_statement(), workflow_ref=ref, payload_type="text/plain")
    with pytest.raises(SignatureError, match="payload type 'text/plain'"):
        _verify(plain, sigstore_root)


@pytest.mark.parametrize(
    ("flaw", "reason"),
    [
        (Flaw.SET, "SET: invalid inclusion promise"),
        (Flaw.CHECKPOINT, "checkpoint: invalid signature"),
        (Flaw.PROOF, "inclusion proof contains invalid root hash"),
        (Flaw.NO_SCT, "does not contain a signed certificate timestamp"),
        (Flaw.EXPIRED, "not valid at validation time"),
        (Flaw.DSSE_SIGNATURE, "DSSE: invalid signature"),
    ],
)
def test_refused_tampered(
    sigstore_test_instance: SigstoreInstance, sigstore_root: Path, flaw: Flaw, reason: str
) -> None:
    ref = f"{WORKFLOW}@refs/tags/v1.0.0"
    bundle = sigstore_test_instance.bundle(_statement(), workflow_ref=ref, flaw=flaw)
    with pytest.raises(SignatureError) as caught:
        _verify(bundle, sigstore_root)
    message = str(caught.value)
    assert f"signed by {ref}" in message
    assert f"wanted {ref}" in message
    assert reason in message
    assert "\n" not in message


def test_refused_from_another_instance(sigstore_root: Path) -> None:
    other = SigstoreInstance.create("other-sigstore")
    bundle = other.bundle(_statement(), workflow_ref=f"{WORKFLOW}@refs/tags/v1.0.0")
    with pytest.raises(SignatureError, match="certificate chain"):
        _verify(bundle, sigstore_root)
    # ... and against the production root that ships in the package.
    with pytest.raises(SignatureError, match="keyless signature refused"):
        _verify(bundle, keyless.VENDORED_ROOT)


def test_refused_oversized_and_garbage(sigstore_root: Path) -> None:
    with pytest.raises(SignatureError, match="exceeds"):
        _verify(b"{" + b" " * keyless.MAX_BUNDLE_SIZE + b"}", sigstore_root)
    with pytest.raises(SignatureError, match="signed by an unreadable bundle"):
        _verify(b'{"mediaType": "nope"}', sigstore_root)
    with pytest.raises(SignatureError, match="signed by an unreadable bundle"):
        _verify(b"\xff\xfe", sigstore_root)


def test_unusable_root_is_a_config_error(
    sigstore_test_instance: SigstoreInstance, tmp_path: Path
) -> None:
    bundle = sigstore_test_instance.bundle(
        _statement(), workflow_ref=f"{WORKFLOW}@refs/tags/v1.0.0"
    )
    with pytest.raises(ConfigError, match="cannot read Sigstore trusted root"):
        _verify(bundle, tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{}")
    with pytest.raises(ConfigError, match="unusable"):
        _verify(bundle, broken)


def test_workflow_setting_is_checked() -> None:
    assert keyless.parse_workflows(f" {WORKFLOW} ,{WORKFLOW},") == (Workflow(WORKFLOW),)
    assert keyless.parse_workflows("") == ()
    with pytest.raises(ConfigError, match="names a ref"):
        Workflow.parse(f"{WORKFLOW}@refs/heads/main")
    for bad in (
        "https://github.com/acme/assets",
        "http://github.com/acme/assets/.github/workflows/release.yml",
        "https://gitlab.com/acme/assets/.github/workflows/release.yml",
        "https://github.com/acme/assets/.github/workflows/release.sh",
    ):
        with pytest.raises(ConfigError, match="not a GitHub workflow URL"):
            Workflow.parse(bad)


def test_trust_ids_name_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root.json"
    root.write_text("{}")
    ids = keyless.trust_ids([Workflow(WORKFLOW)], root)
    assert len(ids) == 1
    root.write_text("{ }")
    assert keyless.trust_ids([Workflow(WORKFLOW)], root).isdisjoint(ids)
    assert keyless.trust_ids([], root) == frozenset()
    assert keyless.trust_ids([Workflow(WORKFLOW)], tmp_path / "missing") == frozenset()


def test_sign_bundle_signs_the_statement_bytes_as_given() -> None:
    raw = _statement()
    stmt = keyless.raw_statement(raw)
    assert stmt._contents == raw
    assert stmt._pae().endswith(b" " + raw)
    with pytest.raises(ConfigError):
        keyless.raw_statement(b'{"_type": "https://in-toto.io/Statement/v1", "subject": []}')


# -- real public bundles, offline, against the vendored production root ------------------


def _vector(*parts: str) -> Path:
    path = VECTORS.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real Sigstore vectors absent ({path}): see ../shared/sigstore-vectors")
    return path


def _attestation_bundle(path: Path) -> bytes:
    """A PEP 740 attestation as a bundle v0.3 (as pypi-attestations' to_bundle does)."""
    att = json.loads(path.read_text())
    material = att["verification_material"]
    return json.dumps(
        {
            "mediaType": keyless.BUNDLE_MEDIA_TYPE,
            "verificationMaterial": {
                "certificate": {"rawBytes": material["certificate"]},
                "tlogEntries": material["transparency_entries"],
            },
            "dsseEnvelope": {
                "payload": att["envelope"]["statement"],
                "payloadType": keyless.INTOTO_PAYLOAD_TYPE,
                "signatures": [{"sig": att["envelope"]["signature"]}],
            },
        }
    ).encode()


def test_real_dsse_bundle_verifies_offline_against_the_vendored_root() -> None:
    from sigstore.models import Bundle, TrustedRoot
    from sigstore.verify import Verifier

    path = _vector("prod-dsse-pep740", "pypi_attestations-0.0.19.tar.gz.publish.attestation")
    bundle_bytes = _attestation_bundle(path)
    workflow = Workflow(
        "https://github.com/trailofbits/pypi-attestations/.github/workflows/release.yml"
    )
    policy = keyless.WorkflowPolicy(workflow, "0.0.19")
    verifier = Verifier(trusted_root=TrustedRoot.from_file(str(keyless.VENDORED_ROOT)))
    payload_type, payload = verifier.verify_dsse(Bundle.from_json(bundle_bytes), policy)
    assert payload_type == keyless.INTOTO_PAYLOAD_TYPE
    assert json.loads(payload)["subject"][0]["name"] == "pypi_attestations-0.0.19.tar.gz"
    # Through verify_bundle: the signature, log and identity pass; the statement is a PyPI
    # publish attestation of a file, not a release index, and is refused for that.
    subject = json.loads(payload)["subject"][0]["digest"]["sha256"]
    with pytest.raises(SignatureError, match=re.escape("predicate type https://docs.pypi.org")):
        keyless.verify_bundle(
            bundle_bytes,
            index_digest=f"sha256:{subject}",
            version="0.0.19",
            workflows=[workflow],
            trusted_root=None,
        )
    # Another version of the same workflow: refused by the identity policy.
    with pytest.raises(SignatureError, match=r"wanted .*release.yml@refs/tags/v0.0.20"):
        keyless.verify_bundle(
            bundle_bytes,
            index_digest=f"sha256:{subject}",
            version="0.0.20",
            workflows=[workflow],
            trusted_root=None,
        )


def test_real_message_bundle_verifies_offline_against_the_vendored_root() -> None:
    from sigstore.models import Bundle, TrustedRoot
    from sigstore.verify import Verifier

    folder = _vector("prod-hashedrekord")
    bundle = Bundle.from_json((folder / "bundle_v3_github.whl.sigstore").read_bytes())
    workflow = Workflow("https://github.com/trailofbits/rfc8785.py/.github/workflows/release.yml")
    verifier = Verifier(trusted_root=TrustedRoot.from_file(str(keyless.VENDORED_ROOT)))
    verifier.verify_artifact(
        (folder / "bundle_v3_github.whl").read_bytes(),
        bundle,
        keyless.WorkflowPolicy(workflow, "0.1.2"),
    )
    assert keyless.WorkflowPolicy(workflow, None).problem(bundle.signing_certificate) is None


def test_real_branch_identity_is_refused() -> None:
    from sigstore.errors import VerificationError
    from sigstore.models import Bundle, TrustedRoot
    from sigstore.verify import Verifier

    folder = _vector("conformance-happy-path-v0.3")
    bundle = Bundle.from_json((folder / "bundle.sigstore.json").read_bytes())
    identity = keyless.identity_of(bundle.signing_certificate) or ""
    assert identity.endswith("@refs/heads/main")
    workflow = Workflow(identity.split("@", 1)[0])
    verifier = Verifier(trusted_root=TrustedRoot.from_file(str(keyless.VENDORED_ROOT)))
    with pytest.raises(VerificationError, match="not the trusted workflow at a v<version> tag"):
        verifier.verify_artifact(
            (folder / "bv-a.txt").read_bytes(), bundle, keyless.WorkflowPolicy(workflow, None)
        )


def test_real_staging_bundle_is_refused_by_the_production_root() -> None:
    folder = _vector("staging-rekor-v2")
    data = (folder / "bundle.sigstore.json").read_bytes()
    beacon = Workflow(
        "https://github.com/sigstore-conformance/extremely-dangerous-public-oidc-beacon"
        "/.github/workflows/extremely-dangerous-oidc-beacon.yml"
    )

    def verify(root: Path | None) -> None:
        keyless.verify_bundle(
            data, index_digest=DIGEST, version=None, workflows=[beacon], trusted_root=root
        )

    # Production does not know staging's timestamp authority (nor its CA).
    with pytest.raises(SignatureError, match="not enough sources of verified time"):
        verify(None)
    # Against staging's own root, time and chain pass; the branch identity does not.
    with pytest.raises(SignatureError, match="v<version> tag"):
        verify(folder / "trusted_root.json")
