"""TLS trust is loaded for https:// only (`oci.transport`): a plain-HTTP registry is read
without any CA certificate, and an https:// one is verified exactly as httpx does it (its
default trust honours SSL_CERT_FILE), against real registries."""

from __future__ import annotations

from pathlib import Path

import pytest

from exec_sandbox_assets.base.errors import AssetDownloadError, AssetNotFoundError, ConfigError
from exec_sandbox_assets.oci.reference import parse_registry_ref
from exec_sandbox_assets.oci.registry import RegistryClient
from exec_sandbox_assets.oci.retry import RetryPolicy
from servers import RegistryServer

pytestmark = pytest.mark.usefixtures("no_docker_config")

ONCE = RetryPolicy(attempts=1)


async def _answer(ref: str, ca_bundle: Path | None = None) -> None:
    """A real answer from the registry: the tag does not exist."""
    async with RegistryClient(parse_registry_ref(ref), ca_bundle=ca_bundle, retry=ONCE) as client:
        with pytest.raises(AssetNotFoundError):
            await client.get_manifest("v0.0.404")


async def test_a_plain_http_registry_is_read_without_loading_tls_trust(
    registry: RegistryServer, repo_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # httpx's default trust reads SSL_CERT_FILE; a missing file fails only what uses it.
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "no-such-bundle.pem"))
    await _answer(registry.ref(repo_name))
    # A CA bundle the operator configured is checked all the same: a broken one is an
    # error even where only plain HTTP is spoken.
    with pytest.raises(ConfigError, match="cannot load CA bundle"):
        await _answer(registry.ref(repo_name), tmp_path / "no-such-bundle.pem")


async def test_an_https_registry_is_verified_with_the_default_trust_on_first_use(
    tls_registry: RegistryServer, repo_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = tls_registry.ref(repo_name)
    assert ref.startswith("https://")
    async with RegistryClient(parse_registry_ref(ref), retry=ONCE) as client:
        with pytest.raises(AssetDownloadError, match="not trusted"):
            await client.get_manifest("v1")
    # The same default trust, pointed at the registry's CA the way httpx reads it.
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_registry.ca_bundle))
    await _answer(ref)
    # An explicit CA bundle still works.
    monkeypatch.delenv("SSL_CERT_FILE")
    await _answer(ref, tls_registry.ca_bundle)
