"""A certificate the client does not trust fails at once: it is not retried, counted in
TCP connections rather than seconds (test_registry_client.py bounds the same failure
with a wall clock)."""

from __future__ import annotations

import pytest

from exec_sandbox_assets.base.errors import AssetDownloadError, AssetNotFoundError
from exec_sandbox_assets.oci.reference import parse_registry_ref
from exec_sandbox_assets.oci.registry import RegistryClient
from exec_sandbox_assets.oci.retry import RetryPolicy
from servers import LOOPBACK, RegistryServer, TcpRelay

pytestmark = pytest.mark.usefixtures("no_docker_config")


async def test_an_untrusted_certificate_is_not_retried(
    tls_registry: RegistryServer, repo_name: str
) -> None:
    """Counted in TCP connections, not in seconds: with a policy of 4 attempts, a
    certificate the client does not trust costs exactly one connection."""
    relay = TcpRelay((LOOPBACK, tls_registry.port))
    try:
        ref = parse_registry_ref(f"https://{relay.host}/{repo_name}")
        assert ref.scheme == "https"
        retry = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.02)
        async with RegistryClient(ref, retry=retry) as client:
            with pytest.raises(AssetDownloadError, match="not trusted"):
                await client.get_manifest("v1")
        assert relay.connections == 1
        # With the CA the same path gets an answer: the relay is not what failed above.
        async with RegistryClient(ref, ca_bundle=tls_registry.ca_bundle, retry=retry) as client:
            with pytest.raises(AssetNotFoundError):
                await client.get_manifest("v1")
    finally:
        relay.close()
