"""Registry credentials on the command line: `--username/--password-stdin` of the
commands that contact a registry, and `login`, which stores them as docker does
(`oci.credentials.store_credentials`).

Explicit credentials are for one registry host: the one the command names (inspect's
REF, versions' SOURCE, login's SERVER), pull's `--from` (else its first registry
source), mirror's destination (else its source). Other hosts use the auth files.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from exec_sandbox_assets.base.errors import ConfigError
from exec_sandbox_assets.cli.output import EXIT_OK, out
from exec_sandbox_assets.cli.table import Context
from exec_sandbox_assets.config import Settings

if TYPE_CHECKING:  # oci.auth imports httpx: only when credentials were given
    from exec_sandbox_assets.oci.auth import Credentials


def read_registry_password(username: str | None, password_stdin: bool) -> str | None:
    """The password for `--username`: from stdin with --password-stdin, else prompted on
    a terminal; None when no username was given."""
    if password_stdin and not username:
        raise ConfigError("--password-stdin needs --username")
    if not username:
        return None
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        password = getpass.getpass(f"password for {username}: ")
    else:
        raise ConfigError(
            "--username needs --password-stdin (the password or token on stdin) when "
            "stdin is not a terminal"
        )
    if not password:
        raise ConfigError("--password-stdin: no password on stdin")
    return password


def registry_host(text: str) -> str | None:
    """The registry host[:port] a source reference names; None for a layout."""
    from exec_sandbox_assets.oci.reference import RegistryRef, parse_source_ref

    ref = parse_source_ref(text)
    return ref.host if isinstance(ref, RegistryRef) else None


def given_credentials(args: argparse.Namespace) -> Credentials | None:
    password = read_registry_password(args.username, args.password_stdin)
    if password is None:
        return None
    from exec_sandbox_assets.oci.auth import Credentials

    return Credentials(args.username, password)


def first_registry_host(candidates: Sequence[str]) -> str | None:
    for text in candidates:
        if (host := registry_host(text)) is not None:
            return host
    return None


def with_given_credentials(args: argparse.Namespace, settings: Settings) -> Settings:
    """Pull's credentials: for `--from`'s registry, else the first registry source."""
    creds = given_credentials(args)
    if creds is None:
        return settings
    host = first_registry_host([*settings.mirrors, settings.registry])
    if host is None:
        raise ConfigError("--username: no registry among the sources (only oci: layouts)")
    return settings.with_(registry_credentials=((host, creds.username, creds.password),))


async def _check(server: str, creds: Credentials, settings: Settings) -> str:
    from exec_sandbox_assets.oci.reference import parse_registry_ref
    from exec_sandbox_assets.oci.registry import RegistryClient

    # A repository name is needed for a reference; /v2/ is what is asked.
    ref = parse_registry_ref(f"{server.rstrip('/')}/login-check")
    async with RegistryClient(
        ref, credentials=creds, ca_bundle=settings.ca_bundle, policy=settings.transfer_policy()
    ) as client:
        await client.ping()
    return ref.host


def run_login(ctx: Context) -> int:
    from exec_sandbox_assets.oci.auth import Credentials
    from exec_sandbox_assets.oci.credentials import store_credentials

    args, settings = ctx.args, ctx.settings
    creds = given_credentials(args)
    if creds is None:
        if not sys.stdin.isatty():
            raise ConfigError("login needs --username NAME --password-stdin")
        username = input("username: ").strip()
        creds = Credentials(username, read_registry_password(username, False) or "")
    if settings.docker_config is None:
        raise ConfigError("login: no docker config file to store credentials in")
    host = asyncio.run(_check(args.server, creds, settings))
    where = store_credentials(host, creds, settings.docker_config)
    if not ctx.ui.quiet:
        out(f"login succeeded for {host}; credentials stored in {where}")
    return EXIT_OK


__all__ = [
    "first_registry_host",
    "given_credentials",
    "read_registry_password",
    "registry_host",
    "run_login",
    "with_given_credentials",
]
