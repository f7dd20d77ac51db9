"""Registry credentials as docker and podman find them (credHelpers, credsStore, auths,
REGISTRY_AUTH_FILE, podman's auth.json), `--username/--password-stdin`, and `login`,
against a real htpasswd registry with a fake `docker-credential-test` helper on PATH."""

from __future__ import annotations

import base64
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from conftest import HTPASSWD_USERS
from releases import KeyPair, SampleRelease, make_key_pair, publish_sample_release
from servers import RegistryServer
from test_cli import HOST, run
from test_cli_operator import cli

USER, PASSWORD = next(iter(HTPASSWD_USERS.items()))

# A credential helper as docker-credential-helpers behave: `get` reads the server on
# stdin and answers JSON or "credentials not found" (exit 1); `store` reads JSON.
HELPER = """\
import json, os, sys
from pathlib import Path
db_path = Path(os.environ["FAKE_HELPER_DB"])
db = json.loads(db_path.read_text()) if db_path.exists() else {}
action, data = sys.argv[1], sys.stdin.read()
with open(os.environ["FAKE_HELPER_LOG"], "a") as log:
    log.write(f"{action} {data.strip() if action == 'get' else json.loads(data)['ServerURL']}\\n")
if action == "get":
    entry = db.get(data.strip())
    if entry is None:
        print("credentials not found in native keychain")
        sys.exit(1)
    print(json.dumps({"ServerURL": data.strip(), **entry}))
elif action == "store":
    doc = json.loads(data)
    db[doc["ServerURL"]] = {"Username": doc["Username"], "Secret": doc["Secret"]}
    db_path.write_text(json.dumps(db))
else:
    sys.exit(f"unknown action {action}")
"""


@pytest.fixture
def helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`docker-credential-test` on PATH; returns its database (host -> credentials)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "docker-credential-test"
    exe.write_text(f"#!{sys.executable}\n{HELPER}")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_HELPER_DB", str(tmp_path / "helper-db.json"))
    monkeypatch.setenv("FAKE_HELPER_LOG", str(tmp_path / "helper.log"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    return tmp_path / "helper-db.json"


@pytest.fixture
def private(
    tmp_path: Path, htpasswd_registry: RegistryServer, repo_name: str
) -> tuple[SampleRelease, str]:
    """A release on a registry that wants a login; (release, its host)."""
    key = make_key_pair(tmp_path / "keys")
    release = publish_sample_release(
        htpasswd_registry.ref(repo_name),
        "1.0.0",
        tmp_path / "work",
        key=key,
        platforms=[HOST],
        username=USER,
        password=PASSWORD,
    )
    return release, htpasswd_registry.host


def write_json(path: Path, doc: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def versions(release: SampleRelease, *extra: str, stdin: str = "") -> tuple[int, str]:
    key: KeyPair = release.key
    result = cli("--trusted-key", key.public, "versions", release.target, *extra, stdin=stdin)
    return result.code, result.stdout + result.stderr


def test_helpers_then_auths_as_docker_resolves_them(
    helper: Path, tmp_path: Path, private: tuple[SampleRelease, str]
) -> None:
    release, host = private
    config = tmp_path / "docker" / "config.json"
    code, text = versions(release)
    assert code == 1 and "no credentials configured" in text, text

    # credsStore: the helper is asked with the host on stdin.
    write_json(config, {"credsStore": "test", "auths": {}})
    write_json(helper, {host: {"Username": USER, "Secret": PASSWORD}})
    code, text = versions(release)
    assert code == 0 and "v1.0.0" in text and "verified" in text, text
    assert f"get {host}" in (tmp_path / "helper.log").read_text()

    # The helper has nothing for the host: the auths entry is used.
    write_json(helper, {})
    pair = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    write_json(config, {"credsStore": "test", "auths": {host: {"auth": pair}}})
    assert versions(release)[0] == 0

    # credHelpers for this host wins over credsStore; a missing helper is named.
    write_json(config, {"credsStore": "test", "credHelpers": {host: "absent"}})
    code, text = versions(release)
    assert code == 2, text
    assert "docker credential helper docker-credential-absent" in text
    assert f"credHelpers['{host}'] in {config}" in text and "is not on PATH" in text


def test_registry_auth_file_and_podman_auth_json_are_read(
    helper: Path,
    tmp_path: Path,
    private: tuple[SampleRelease, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release, host = private
    pair = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    auth = {"auths": {host: {"auth": pair}}}

    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(write_json(tmp_path / "auth.json", auth)))
    assert versions(release)[0] == 0
    monkeypatch.delenv("REGISTRY_AUTH_FILE")
    assert versions(release)[0] == 1

    runtime = tmp_path / "run"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    write_json(runtime / "containers" / "auth.json", auth)
    assert versions(release)[0] == 0
    (runtime / "containers" / "auth.json").unlink()
    write_json(Path(os.environ["XDG_CONFIG_HOME"]) / "containers" / "auth.json", auth)
    assert versions(release)[0] == 0


def test_username_and_password_stdin_wherever_a_registry_is_contacted(
    helper: Path, tmp_path: Path, private: tuple[SampleRelease, str]
) -> None:
    release, _ = private
    login = ("--username", USER, "--password-stdin")
    assert versions(release, *login, stdin=PASSWORD + "\n")[0] == 0
    code, text = versions(release, *login, stdin="wrong\n")
    assert code == 1 and "credentials were refused" in text, text
    assert versions(release, "--password-stdin", stdin=PASSWORD)[0] == 2  # no --username

    key = release.key.public
    inspect = cli(
        "--trusted-key", key, "inspect", f"{release.target}:v1.0.0", *login, stdin=PASSWORD
    )
    assert inspect.code == 0 and "verdict: VERIFIED" in inspect.stdout, inspect.stderr

    common: list[str | Path] = ["--cache-dir", tmp_path / "cache", "--trusted-key", key, "--airgap"]
    pulled = cli(
        *common,
        "--asset-version",
        "1.0.0",
        "pull",
        "--from",
        release.target,
        "--json",
        *login,
        stdin=PASSWORD,
    )
    assert pulled.code == 0, pulled.stderr
    assert pulled.json()["index_digest"] == release.index_digest

    copied = cli(
        "--trusted-key",
        key,
        "mirror",
        release.target,
        f"oci:{tmp_path / 'copy'}",
        "--version",
        "1.0.0",
        "--work-dir",
        tmp_path / "mw",
        *login,
        stdin=PASSWORD,
    )
    assert copied.code == 0, copied.stderr


def test_login_stores_credentials_like_docker(
    helper: Path, tmp_path: Path, private: tuple[SampleRelease, str]
) -> None:
    release, host = private
    config = tmp_path / "docker" / "config.json"
    bad = cli("login", f"http://{host}", "-u", USER, "--password-stdin", stdin="wrong")
    assert bad.code == 1 and not config.exists(), bad.stderr

    good = cli("login", f"http://{host}", "-u", USER, "--password-stdin", stdin=PASSWORD)
    assert good.code == 0, good.stderr
    assert f"login succeeded for {host}; credentials stored in {config}" in good.stdout
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    entry = json.loads(config.read_text())["auths"][host]
    assert base64.b64decode(entry["auth"]).decode() == f"{USER}:{PASSWORD}"
    assert versions(release)[0] == 0  # used from now on

    # With a credsStore, the secret goes to the helper; config.json records the host.
    write_json(config, {"credsStore": "test"})
    stored = cli("login", f"http://{host}", "-u", USER, "--password-stdin", stdin=PASSWORD)
    assert stored.code == 0 and "docker-credential-test" in stored.stdout, stored.stderr
    assert json.loads(helper.read_text())[host] == {"Username": USER, "Secret": PASSWORD}
    assert json.loads(config.read_text()) == {"credsStore": "test", "auths": {host: {}}}
    assert versions(release)[0] == 0
    assert run("login", "--help").code == 0


def test_login_to_a_token_registry_checks_through_the_token_endpoint(
    token_registry: RegistryServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    server = f"http://{token_registry.host}"
    bad = cli("login", server, "-u", "pusher", "--password-stdin", stdin="wrong")
    assert bad.code == 1 and "token endpoint" in bad.stderr and "401" in bad.stderr
    assert not (tmp_path / "docker" / "config.json").exists()
    good = cli("login", server, "-u", "pusher", "--password-stdin", stdin="s3cret")
    assert good.code == 0, good.stderr
    auths = json.loads((tmp_path / "docker" / "config.json").read_text())["auths"]
    assert base64.b64decode(auths[token_registry.host]["auth"]) == b"pusher:s3cret"


def test_a_failing_or_hanging_helper_is_an_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from exec_sandbox_assets.base.errors import ConfigError
    from exec_sandbox_assets.oci import credentials

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (
        ("broken", "printf 'keychain is locked' >&2; exit 3"),
        ("slow", "exec sleep 30"),
        ("garbled", "echo 'not json'"),
    ):
        # sh starts in milliseconds: a Python helper missed the timeout on a loaded machine.
        exe = bin_dir / f"docker-credential-{name}"
        exe.write_text(f"#!/bin/sh\n{body}\n")
        exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(credentials, "HELPER_TIMEOUT", 2.0)
    config = tmp_path / "config.json"
    for name, expected in (
        ("broken", "failed for h.io (exit 3): keychain is locked"),
        ("slow", "did not answer within"),
        ("garbled", "without a JSON object holding 'Username' and 'Secret'"),
    ):
        write_json(config, {"credsStore": name})
        with pytest.raises(ConfigError) as info:
            credentials.find_credentials("h.io", [config])
        assert f"docker-credential-{name} (credsStore in {config})" in str(info.value)
        assert expected in str(info.value)
