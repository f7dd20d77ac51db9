"""Registry credentials as docker and podman find them, and `login`'s way of storing them.

Search order for a registry host (`host[:port]`):

1. credentials given explicitly (`--username/--password-stdin`: `given_credentials`);
2. each auth file in turn (the caller's list, `config.auth_files`: $REGISTRY_AUTH_FILE, docker's
   config.json, podman's auth.json locations), and in each, as docker does:
   `credHelpers[host]`, else `credsStore` (the helper runs as
   `docker-credential-NAME get` with the host on stdin and answers JSON), else the
   `auths` entry (`oci.auth.load_docker_credentials`).

A helper that says it has nothing for the host ("credentials not found") lets the
search go on; a helper that is missing, fails or hangs (`HELPER_TIMEOUT`) is a
ConfigError naming it and the file that configured it, as docker reports it: pulling
anonymously instead would turn a broken login into a confusing 401 later.

Storing (`store_credentials`, for `login`) follows docker too: the helper configured
for the host (`store`), with an empty `auths` entry recording the host, else
base64 `user:password` in `auths`; config.json is written atomically, mode 0600.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from exec_sandbox_assets.base.errors import ConfigError
from exec_sandbox_assets.base.fsutil import atomic_output
from exec_sandbox_assets.oci.auth import Credentials, load_docker_credentials

HELPER_PREFIX = "docker-credential-"
HELPER_TIMEOUT = 30.0
_MAX_HELPER_OUTPUT = 64 * 1024
# What docker-credential-helpers print (exit 1) when they hold nothing for a server.
_NOT_FOUND = "credentials not found"
# The identity-token convention of docker's helpers and config.json.
TOKEN_USER = "<token>"  # noqa: S105 (a user name marker)


def given_credentials(host: str, given: Sequence[tuple[str, str, str]]) -> Credentials | None:
    """Of the (host, username, password) given explicitly, those for `host`."""
    for given_host, username, password in given:
        if given_host.lower() == host.lower():
            return Credentials(username, password)
    return None


def find_credentials(host: str, auth_files: Sequence[Path]) -> Credentials | None:
    """The credentials for `host` in `auth_files`, searched in order (module docstring),
    or None."""
    wanted = host.lower()
    for path in auth_files:
        found = _from_file(wanted, path)
        if found is not None:
            return found
    return None


def _read_config(path: Path) -> dict[str, Any] | None:
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read registry auth file {path}: {exc}") from None
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ConfigError(f"registry auth file {path} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"registry auth file {path}: expected a JSON object")
    return doc


def helper_for(host: str, doc: dict[str, Any], path: Path) -> tuple[str, str] | None:
    """(helper name, which key configured it) for `host` in one auth file, or None."""
    helpers = doc.get("credHelpers", {})
    if not isinstance(helpers, dict):
        raise ConfigError(f"registry auth file {path}: 'credHelpers' must be an object")
    by_host = {str(k).lower(): v for k, v in helpers.items()}
    name = by_host.get(host)
    if isinstance(name, str) and name:
        return name, f"credHelpers[{host!r}]"
    store = doc.get("credsStore")
    if isinstance(store, str) and store:
        return store, "credsStore"
    return None


def _from_file(host: str, path: Path) -> Credentials | None:
    doc = _read_config(path)
    if doc is None:
        return None
    helper = helper_for(host, doc, path)
    if helper is not None:
        found = helper_get(helper[0], host, f"{helper[1]} in {path}")
        if found is not None:
            return found
    return load_docker_credentials(host, path)


def run_helper(name: str, action: str, stdin: bytes, where: str) -> tuple[int, bytes]:
    """Run `docker-credential-NAME ACTION` with `stdin`; (exit status, stdout)."""
    program = HELPER_PREFIX + name
    exe = shutil.which(program)
    if exe is None:
        raise ConfigError(
            f"docker credential helper {program} ({where}) is not on PATH: install it, or "
            "remove it from that file to use its 'auths' entries"
        )
    try:
        proc = subprocess.run(
            [exe, action],
            input=stdin,
            capture_output=True,
            timeout=HELPER_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ConfigError(
            f"docker credential helper {program} ({where}) did not answer within "
            f"{HELPER_TIMEOUT:g}s"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"docker credential helper {program} ({where}) could not run: {exc}"
        ) from None
    # Helpers print "credentials not found" on stdout, other failures on either stream.
    output = proc.stdout[:_MAX_HELPER_OUTPUT]
    if proc.returncode != 0:
        output += proc.stderr[:1024]
    return proc.returncode, output


def helper_get(name: str, host: str, where: str) -> Credentials | None:
    """What helper `name` holds for `host`; None when it says it has nothing."""
    program = HELPER_PREFIX + name
    status, output = run_helper(name, "get", host.encode(), where)
    text = output.decode(errors="replace").strip()
    if status != 0:
        if _NOT_FOUND in text.lower():
            return None
        raise ConfigError(
            f"docker credential helper {program} ({where}) failed for {host} "
            f"(exit {status}): {text[:300]}"
        )
    try:
        doc = json.loads(output)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        doc = None
    username = doc.get("Username") if isinstance(doc, dict) else None
    secret = doc.get("Secret") if isinstance(doc, dict) else None
    if not isinstance(username, str) or not isinstance(secret, str):
        raise ConfigError(
            f"docker credential helper {program} ({where}) answered for {host} without "
            "a JSON object holding 'Username' and 'Secret'"
        )
    if not secret:
        return None
    return Credentials(username or TOKEN_USER, secret)


def store_credentials(host: str, credentials: Credentials, config_path: Path) -> str:
    """Store `credentials` for `host` as `docker login` does; returns where they went."""
    doc = _read_config(config_path) or {}
    auths = doc.setdefault("auths", {})
    if not isinstance(auths, dict):
        raise ConfigError(f"registry auth file {config_path}: 'auths' must be an object")
    helper = helper_for(host, doc, config_path)
    if helper is not None:
        name, key = helper
        entry = {
            "ServerURL": host,
            "Username": credentials.username,
            "Secret": credentials.password,
        }
        where = f"{key} in {config_path}"
        status, output = run_helper(name, "store", json.dumps(entry).encode(), where)
        if status != 0:
            raise ConfigError(
                f"docker credential helper {HELPER_PREFIX}{name} ({where}) could not store "
                f"the credentials for {host} (exit {status}): "
                f"{output.decode(errors='replace').strip()[:300]}"
            )
        auths[host] = {}  # docker records the host; the secret stays in the helper
        stored = f"credential helper {HELPER_PREFIX}{name}"
    else:
        pair = f"{credentials.username}:{credentials.password}".encode()
        auths[host] = {"auth": base64.b64encode(pair).decode()}
        stored = str(config_path)
    config_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with atomic_output(config_path, mode=0o600) as out:
        out.write((json.dumps(doc, indent="\t") + "\n").encode())
    return stored


__all__ = [
    "HELPER_PREFIX",
    "HELPER_TIMEOUT",
    "TOKEN_USER",
    "find_credentials",
    "given_credentials",
    "helper_for",
    "helper_get",
    "run_helper",
    "store_credentials",
]
