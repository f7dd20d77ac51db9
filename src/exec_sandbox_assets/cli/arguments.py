"""The options of each command (argparse), and the settings options every command takes.

Pure argparse: what a command does is in its handler module, which options it gets
beyond its own is decided by its entry in `table.COMMANDS`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

AFTER = "__after_command"


def add_global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """Settings and output options. On subcommands (`suppress`) they set nothing unless
    given, under their own names, merged by `merge_global_options`: `-v pull -v` counts
    two, `--mirror A pull --mirror B` keeps both, a single value given after the command
    wins."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    first = len(parser._actions)
    g = parser.add_argument_group("settings (each overrides its EXEC_SANDBOX_* variable)")
    g.add_argument(
        "--cache-dir", type=Path, metavar="DIR", default=default(None), help="cache directory"
    )
    g.add_argument(
        "--asset-version",
        dest="asset_version",
        metavar="V",
        default=default(None),
        help="release to use: 0.22.0, v0.22.0 or latest (EXEC_SANDBOX_ASSET_VERSION)",
    )
    g.add_argument(
        "--registry",
        metavar="REF",
        default=default(None),
        help="default repository (ghcr.io/dualeai/exec-sandbox-assets)",
    )
    g.add_argument(
        "--mirror",
        action="append",
        metavar="SOURCE",
        default=default(None),
        help="source tried first, repeatable: HOST/REPO, http://HOST:PORT/REPO, oci:DIR, "
        "oci-archive:FILE (replaces EXEC_SANDBOX_REGISTRY_MIRRORS)",
    )
    g.add_argument(
        "--trusted-key",
        action="append",
        type=Path,
        metavar="FILE",
        default=default(None),
        help="PEM public key trusted to sign releases, repeatable "
        "(replaces EXEC_SANDBOX_TRUSTED_KEYS and the packaged keys)",
    )
    g.add_argument(
        "--trusted-workflow",
        action="append",
        metavar="URL",
        default=default(None),
        help="release workflow trusted to sign keyless at tags v<version>, repeatable: "
        "https://github.com/OWNER/REPO/.github/workflows/FILE.yml; '' trusts none "
        "(replaces EXEC_SANDBOX_TRUSTED_WORKFLOWS)",
    )
    g.add_argument(
        "--sigstore-root",
        type=Path,
        metavar="FILE",
        default=default(None),
        help="Sigstore trusted_root.json instead of the packaged one (EXEC_SANDBOX_SIGSTORE_ROOT)",
    )
    g.add_argument(
        "--offline",
        action="store_true",
        default=default(False),
        help="never use the network: cache and oci:/oci-archive: sources only",
    )
    g.add_argument(
        "--airgap",
        action="store_true",
        default=default(False),
        help="never contact the public defaults (ghcr.io, github.com)",
    )
    g.add_argument(
        "--insecure-skip-verify",
        action="store_true",
        default=default(False),
        help="accept unsigned releases (logged loudly; for testing only)",
    )
    g.add_argument(
        "--ca-bundle",
        type=Path,
        metavar="FILE",
        default=default(None),
        help="PEM CA bundle for registries with a private CA",
    )
    add_output_options(parser, suppress=suppress)
    if suppress:
        for action in parser._actions[first:]:
            action.dest += AFTER


def add_output_options(parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """-v, -q and --no-progress: the same on every command (publish included)."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    g = parser.add_argument_group("output")
    g.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default(0),
        help="debug logs on stderr (-vv: HTTP internals too)",
    )
    g.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default(False),
        help="print only errors (and the --json document); no progress",
    )
    g.add_argument(
        "--no-progress",
        action="store_true",
        default=default(False),
        help="no progress display (EXEC_SANDBOX_DISABLE_PROGRESS_BARS=1)",
    )


def merge_global_options(args: argparse.Namespace) -> argparse.Namespace:
    """Fold options given after the command into those given before it."""
    for key, value in list(vars(args).items()):
        if not key.endswith(AFTER):
            continue
        delattr(args, key)
        name = key.removesuffix(AFTER)
        before = getattr(args, name, None)
        if isinstance(value, list) and isinstance(before, list):
            value = before + value
        elif name == "verbose":
            value = (before or 0) + value
        setattr(args, name, value)
    return args


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document on stdout (for scripts)"
    )


def add_registry_login(parser: argparse.ArgumentParser, which: str) -> None:
    """--username/--password-stdin: credentials for the registry the command contacts."""
    g = parser.add_argument_group("registry login (else docker/podman credentials)")
    g.add_argument("--username", "-u", metavar="NAME", help=f"registry user name for {which}")
    g.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the registry password or token from stdin (needs --username)",
    )


def pull_args(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--arch", metavar="ARCH", help="VM CPU arch: x86_64 or aarch64 (default: the host's)"
    )
    where.add_argument(
        "--platform",
        metavar="OS/ARCH",
        help="host platform: linux/amd64, linux/arm64, darwin/arm64, darwin/amd64",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--language",
        action="append",
        metavar="L",
        help="base image to fetch, repeatable: python, javascript, raw (default: all)",
    )
    which.add_argument("--all", action="store_true", help="every base image (the default)")
    p.add_argument(
        "--from",
        dest="source",
        metavar="SOURCE",
        help="try this source first: a registry reference, oci:DIR or oci-archive:FILE",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="re-hash the cached files (reads every byte) and fetch again what does not "
        "match its digest",
    )


def verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--full",
        action="store_true",
        help="re-hash every file against its recorded digest (reads every byte); a file "
        "that does not match loses its record, so the next pull or boot fetches it again",
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help="--full, then fetch again at once every file that failed (from the configured "
        "sources); a file whose bytes match but whose stat changed gets its stat recorded",
    )


def gc_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dry-run", action="store_true", help="print what would be freed; delete nothing"
    )
    p.add_argument(
        "--keep", type=int, default=1, metavar="N", help="newest versions to keep (default 1)"
    )
    p.add_argument(
        "--partials",
        action="store_true",
        help="also remove resumable downloads (partials, and verified blobs a full disk "
        "kept): frees their space, but the next pull starts those files from 0",
    )


def inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "ref",
        metavar="REF",
        help="docker://HOST/REPO:TAG, http://HOST:PORT/REPO:TAG, oci:DIR:TAG, "
        "oci-archive:FILE:TAG (no tag: the asset version, else latest)",
    )
    p.add_argument(
        "--require-signature",
        action="store_true",
        help="exit 3 unless the signature verifies with the trusted keys",
    )


def versions_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source",
        metavar="SOURCE",
        nargs="?",
        help="HOST/REPO, http://HOST:PORT/REPO, oci:DIR, oci-archive:FILE "
        "(default: the first configured mirror, else the registry)",
    )


def mirror_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "src", metavar="SRC", help="HOST/REPO, http://HOST:PORT/REPO, oci:DIR, oci-archive:FILE"
    )
    p.add_argument(
        "dst", metavar="DST", help="HOST/REPO, http://HOST:PORT/REPO, oci:DIR, oci-archive:FILE"
    )
    p.add_argument(
        "--version",
        dest="versions",
        action="append",
        metavar="V",
        help="release to copy, repeatable: 0.22.0 or latest (default: the asset version)",
    )
    p.add_argument(
        "--platform",
        dest="platforms",
        action="append",
        metavar="OS/ARCH",
        help="repeatable: a platform the release must hold (a check, not a filter: a "
        "signed index is copied whole, with every platform it has)",
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        metavar="DIR",
        help="downloads in progress, resumed by a re-run (default: CACHE_DIR/mirror-work)",
    )


def keygen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--algorithm",
        choices=("ecdsa-p256", "ed25519"),
        default="ecdsa-p256",
        help="key type (default ecdsa-p256, as cosign)",
    )
    p.add_argument(
        "--out",
        metavar="PREFIX",
        default="release",
        help="writes PREFIX.key (0600) and PREFIX.pub (default: release)",
    )
    p.add_argument(
        "--password-env",
        metavar="NAME",
        help="encrypt the private key with the password in this environment variable",
    )


def login_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "server", metavar="SERVER", help="registry: HOST[:PORT], or http://HOST:PORT (plain HTTP)"
    )


def demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dir", metavar="DIR", help="work directory (default: a new temporary directory)"
    )
    p.add_argument(
        "--level", type=int, default=3, help="zstd level of the sample release (default 3)"
    )


def completion_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("shell", choices=("bash", "zsh", "fish"), help="the shell to complete for")


def no_args(p: argparse.ArgumentParser) -> None:
    pass


__all__ = [
    "AFTER",
    "add_global_options",
    "add_json",
    "add_output_options",
    "add_registry_login",
    "merge_global_options",
]
