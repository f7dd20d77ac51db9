"""Redirects to a blob CDN are followed without sending the registry's credentials
there, also once the client already holds credentials for the registry and the CDN
answers with a challenge of its own (a hostile CDN asking for a token)."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import HTPASSWD_USERS
from exec_sandbox_assets.base.errors import AuthError
from exec_sandbox_assets.oci.auth import Credentials
from exec_sandbox_assets.oci.model import (
    EMPTY_DESCRIPTOR,
    EMPTY_JSON,
    MEDIA_TYPE_MANIFEST,
    Descriptor,
    Manifest,
)
from exec_sandbox_assets.oci.reference import parse_registry_ref
from exec_sandbox_assets.oci.registry import RegistryClient
from exec_sandbox_assets.oci.retry import RetryPolicy
from servers import HostileCdn, RedirectingRegistry, RegistryServer

pytestmark = pytest.mark.usefixtures("no_docker_config")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def hostile_cdn() -> Iterator[HostileCdn]:
    with HostileCdn() as cdn:
        yield cdn


def _push(server: RegistryServer, repo: str, auth: tuple[str, str], blob: bytes) -> None:
    """Monolithic uploads of an empty config and `blob`, then a manifest tagged v1."""
    with httpx.Client(base_url=server.url, auth=auth) as client:
        for data in (EMPTY_JSON, blob):
            start = client.post(f"/v2/{repo}/blobs/uploads/")
            assert start.status_code == 202, start.text
            location = start.headers["location"]
            sep = "&" if "?" in location else "?"
            done = client.put(f"{location}{sep}digest={sha256(data)}", content=data)
            assert done.status_code == 201, done.text
        manifest = Manifest(
            config=EMPTY_DESCRIPTOR,
            layers=(Descriptor.for_bytes("application/vnd.exec-sandbox.kernel.v1+zstd", blob),),
            artifact_type="application/vnd.exec-sandbox.assets.v1",
        ).to_bytes()
        put = client.put(
            f"/v2/{repo}/manifests/v1",
            content=manifest,
            headers={"Content-Type": MEDIA_TYPE_MANIFEST},
        )
        assert put.status_code == 201, put.text


async def test_cdn_challenge_is_ignored_once_the_client_holds_credentials(
    hostile_cdn: HostileCdn, tmp_path: Path, repo_name: str
) -> None:
    """A first request teaches the client that the registry wants Basic credentials;
    from then on every request carries them at once. A blob GET then ends at a CDN
    that challenges for a token: the client must not answer it (with the registry's
    password in the token request) nor send anything there but the bare redirect."""
    port, seen = hostile_cdn.port, hostile_cdn.seen
    user, password = next(iter(HTPASSWD_USERS.items()))
    blob = b"kernel bytes " * 1000
    server = RedirectingRegistry(
        tmp_path / "reg", f"http://localhost:{port}", auth="htpasswd", users={user: password}
    )
    with server:
        _push(server, repo_name, (user, password), blob)
        ref = parse_registry_ref(f"{server.url}/{repo_name}")
        retry = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.02)
        async with RegistryClient(ref, credentials=Credentials(user, password), retry=retry) as c:
            data, _, _ = await c.get_manifest("v1")  # authenticated: Basic from now on
            assert Manifest.from_bytes(data, "v1").layers[0].digest == sha256(blob)
            with pytest.raises(AuthError) as info:
                await c.get_blob(sha256(blob), len(blob))
    assert "redirect target" in str(info.value)
    assert seen, "the blob GET never reached the CDN: not the case under test"
    assert [path for path, _ in seen if path.startswith("/steal")] == []
    assert [auth for _, auth in seen if auth is not None] == []
    basic = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    assert all(auth != basic for _, auth in seen)
