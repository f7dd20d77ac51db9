"""A registry on this machine's loopback is plain HTTP unless `https://` is written (as
docker and crane take `localhost` and 127.0.0.0/8), and a scheme that does not match
the server is met with the reference to type, not an API URL (issue #19 item 4).
Real registries (docker-registry) on 127.0.0.1, through the CLI."""

from __future__ import annotations

from pathlib import Path

from exec_sandbox_assets.publish import PublishRequest, make_sample_inputs, publish
from releases import make_key_pair
from servers import RegistryServer
from test_cli import run

VERSION = "1.0.0"


def test_a_loopback_registry_without_a_scheme_is_plain_http(
    registry: RegistryServer, repo_name: str, tmp_path: Path
) -> None:
    """Was: `127.0.0.1:PORT/repo` was tried over HTTPS and failed ("answered a TLS
    handshake in plain HTTP"), for publish and for every reader."""
    key = make_key_pair(tmp_path / "keys")
    dist = make_sample_inputs(tmp_path / "dist", size=4096)
    bare = f"{registry.host}/{repo_name}"
    assert not bare.startswith("http")
    result = publish(
        PublishRequest(
            inputs=(dist,),
            version=VERSION,
            targets=(bare,),
            keys=(key.private,),
            work_dir=tmp_path / "work",
            level=3,
            platforms=(("linux", "amd64"),),
        )
    )
    assert result.blobs_uploaded > 0
    for ref in (bare, f"docker://{bare}", f"localhost:{registry.port}/{repo_name}"):
        shown = run("--trusted-key", key.public, "inspect", f"{ref}:v{VERSION}")
        assert shown.code == 0, shown.stderr
        assert "verdict: VERIFIED" in shown.stdout


def test_https_to_a_plain_registry_and_http_to_a_tls_one_name_the_reference_to_type(
    registry: RegistryServer, tls_registry: RegistryServer, repo_name: str
) -> None:
    tls = run("inspect", f"https://{registry.host}/{repo_name}:v1")
    assert tls.code == 1, tls.stderr
    assert f"name it http://{registry.host}/{repo_name}:" in tls.stderr
    assert "/v2/" not in tls.stderr.split("name it", 1)[1]

    plain = run("inspect", f"{tls_registry.host}/{repo_name}:v1")  # loopback: plain HTTP
    assert plain.code == 1, plain.stderr
    assert f"it serves https, not http; name it https://{tls_registry.host}/{repo_name}" in (
        plain.stderr
    )
