"""Signatures accumulate (issue #11 item 3): publishing a release again with another
key adds its signature, as cosign appends; `replace_signatures` keeps only the given
keys'; a signature that does not verify with its key is never written. Against a
real registry, checked by the client itself (`AssetClient`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from exec_sandbox_assets.base.errors import SignatureError
from exec_sandbox_assets.client import AssetClient
from exec_sandbox_assets.config import Settings
from exec_sandbox_assets.oci.model import signature_tag
from exec_sandbox_assets.publish import PublishRequest, PublishResult, make_sample_inputs, publish
from exec_sandbox_assets.publish.signatures import plan_signature
from exec_sandbox_assets.release import catalog, keys, signing
from releases import KeyPair, make_key_pair, read_manifest
from servers import RegistryServer

VERSION = "0.9.2"
CREATED = "2026-03-04T05:06:07Z"
PLATFORMS = (("linux", "amd64"),)


def _publish(target: str, dist: Path, key: KeyPair, work: Path, **options: Any) -> PublishResult:
    return publish(
        PublishRequest(
            inputs=(dist,),
            version=VERSION,
            targets=(target,),
            keys=(key.private,),
            work_dir=work,
            created=CREATED,
            level=3,
            platforms=PLATFORMS,
            **options,
        )
    )


def _client_fetches(target: str, trusted: KeyPair, cache: Path) -> Path:
    """A client trusting only `trusted` pulls the kernel (raises unless it verifies)."""
    settings = Settings(
        cache_dir=cache,
        local_build_dir=None,
        gvproxy_build_dir=None,
        version=VERSION,
        registry=target,
        releases_url="",
        trusted_keys=(trusted.public,),
        docker_config=cache / "no-docker-config.json",
        host_os="linux",
        host_goarch="amd64",
    )
    spec = catalog.kernel("x86_64")
    return asyncio.run(AssetClient(settings).fetch([spec]))[spec.output_name]


def _signature_layers(target: str, work: Path, index_digest: str) -> int:
    data = read_manifest(target, work, signature_tag(index_digest))
    return len(signing.read_signature_manifest(data, "test"))


def test_a_second_key_adds_its_signature_and_the_flag_replaces_them(
    registry: RegistryServer, repo_name: str, tmp_path: Path
) -> None:
    target = registry.ref(repo_name)
    dist = make_sample_inputs(tmp_path / "dist", size=16 * 1024)
    a, b = make_key_pair(tmp_path / "keys", "a"), make_key_pair(tmp_path / "keys", "b")
    work = tmp_path / "work"

    first = _publish(target, dist, a, work)
    second = _publish(target, dist, b, work)

    assert second.index_digest == first.index_digest
    assert (first.signatures, second.signatures) == (1, 2)
    assert _signature_layers(target, tmp_path / "read", first.index_digest) == 2
    _client_fetches(target, a, tmp_path / "cache-a")
    _client_fetches(target, b, tmp_path / "cache-b")
    # Publishing again with a key that signed already changes nothing.
    assert _publish(target, dist, a, work).signature_digest == second.signature_digest

    _publish(target, dist, b, work, replace_signatures=True)

    assert _signature_layers(target, tmp_path / "read", first.index_digest) == 1
    with pytest.raises(SignatureError, match="0 trusted key"):
        _client_fetches(target, a, tmp_path / "cache-a2")
    _client_fetches(target, b, tmp_path / "cache-b2")


@dataclass(frozen=True)
class _MismatchedKey:
    """A signing key whose private half is not its public half's (a broken HSM or key
    store): the fault the publisher must catch before it writes anything."""

    public: keys.PublicKey
    private: keys.SigningKey

    def sign(self, payload: bytes) -> bytes:
        return self.private.sign(payload)


def test_a_signature_that_does_not_verify_with_its_key_is_refused() -> None:
    key = _MismatchedKey(keys.generate_key().public, keys.generate_key())
    digest = "sha256:" + "1" * 64

    with pytest.raises(SignatureError, match="0 trusted key"):
        plan_signature([], [key], digest, "example/repo", VERSION, CREATED)  # type: ignore[list-item]


def test_the_summary_counts_the_signatures_held_and_those_added(tmp_path: Path) -> None:
    """Was: "(1 key(s))" after a second key's publish, though the manifest held 2."""
    from test_cli import run

    dist = make_sample_inputs(tmp_path / "dist", size=16 * 1024)
    a, b = make_key_pair(tmp_path / "keys", "a"), make_key_pair(tmp_path / "keys", "b")
    target = f"oci:{tmp_path / 'layout'}"
    base = ["publish", "-i", str(dist), "--version", VERSION, "--created", CREATED]
    base += ["--level", "3", "--platform", "linux/amd64", "--to", target]

    lines = []
    for key in (a, b, b):
        result = run(*base, "--key", key.private, "--work-dir", tmp_path / "work")
        assert result.code == 0, result.stderr
        lines += [line for line in result.stdout.splitlines() if "signature " in line]
    assert [line.split(".sig: ", 1)[1] for line in lines] == [
        "1 signature (1 added)",
        "2 signatures (1 added)",
        "2 signatures (0 added)",
    ]
    doc = run(*base, "--key", a.private, "--json", "--work-dir", tmp_path / "work").json()
    assert (doc["signatures"], doc["signatures_added"], doc["signers"]) == (2, 0, 1)
