"""A registry target is built without network I/O; `connect` is the step that probes,
logs in and proves push rights, and it refuses bad options before it sends anything."""

from __future__ import annotations

from typing import Any

import oras.provider
import pytest

from exec_sandbox_assets.base.errors import (
    AssetDownloadError,
    AssetError,
    ConfigError,
    SizeLimitError,
)
from exec_sandbox_assets.oci.model import MAX_MANIFEST_SIZE
from exec_sandbox_assets.oci.reference import parse_registry_ref
from exec_sandbox_assets.oci.registry_session import RegistrySession
from exec_sandbox_assets.oci.registry_target import RegistryTarget
from servers import free_port
from servers.scripted import Answer, HostileServer

pytestmark = pytest.mark.usefixtures("no_docker_config")


def _closed_port_ref() -> str:
    return f"http://127.0.0.1:{free_port()}/team/assets"  # nothing listens there


def test_constructing_a_target_sends_nothing() -> None:
    ref = parse_registry_ref(_closed_port_ref())
    client: Any = oras.provider.Registry(hostname=ref.host, insecure=True)
    target = RegistryTarget(RegistrySession(ref, client), chunk_size=64 * 1024)
    assert target.name == str(ref)
    assert (target.stats.blobs_uploaded, target.stats.blobs_skipped) == (0, 0)
    target.close(True)


def test_connect_refuses_bad_options_before_any_request() -> None:
    text = _closed_port_ref()
    with pytest.raises(ConfigError, match="chunk size"):
        RegistryTarget.connect(text, chunk_size=0)
    with pytest.raises(ConfigError, match="both a registry username and a password"):
        RegistryTarget.connect(text, username="pusher")
    with pytest.raises(ConfigError, match="without a tag or digest"):
        RegistryTarget.connect(text + ":v1")


def test_connect_is_where_the_registry_is_reached() -> None:
    with pytest.raises(AssetDownloadError, match="cannot reach registry"):
        RegistryTarget.connect(_closed_port_ref())


def _target_on(server: HostileServer) -> RegistryTarget:
    ref = parse_registry_ref(f"http://{server.host}/team/assets")
    client: Any = oras.provider.Registry(hostname=ref.host, insecure=True)
    return RegistryTarget(RegistrySession(ref, client))


def test_reading_back_a_manifest_is_capped_while_reading() -> None:
    """A destination that answers a read-back with an endless manifest is refused after
    the cap, not read whole into memory first."""
    with HostileServer() as server:
        server.route(
            "/v2/team/assets/manifests/v1.0.0",
            Answer(200, body=b"{" + b" " * (MAX_MANIFEST_SIZE + 10)),
        )
        target = _target_on(server)
        with pytest.raises(SizeLimitError, match="exceeds"):
            target.read_manifest("v1.0.0")
        target.close(True)


def test_a_registry_error_text_cannot_drive_the_terminal() -> None:
    """The push side shows a registry's error text as the pull side does: cleaned."""
    body = b'{"errors": [{"code": "DENIED", "message": "\x1b[2Jgone\\u001b[31m"}]}'
    with HostileServer() as server:
        server.route("/v2/team/assets/manifests/v1.0.0", Answer(400, body=body))
        target = _target_on(server)
        with pytest.raises(AssetError) as info:
            target.read_manifest("v1.0.0")
        target.close(True)
    assert "\x1b" not in str(info.value) and "DENIED" in str(info.value)
