"""The argparse parser built from the command table, and the settings it yields.

`--version` prints the program version; the release to use is `--asset-version`.
A mistyped command gets "did you mean" suggestions (difflib), as git and pip do.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence
from typing import NoReturn

from exec_sandbox_assets.base.errors import ConfigError
from exec_sandbox_assets.cli import arguments
from exec_sandbox_assets.cli.output import (
    EXIT_CODES_HELP,
    EXIT_USAGE,
    Failure,
    emit_json,
    json_result,
)
from exec_sandbox_assets.cli.table import COMMANDS
from exec_sandbox_assets.config import Settings, load_settings

PROG = "exec-sandbox-assets"

DESCRIPTION = """\
Fetch, check, copy and publish the exec-sandbox VM assets (kernels, initramfs, base
images, gvproxy), distributed as signed OCI artifacts.

Every option below overrides its EXEC_SANDBOX_* environment variable; options may be
given before or after the command."""

EPILOG = f"""\
examples:
  {PROG} demo                                   # the whole round trip, no server needed
  {PROG} pull                                   # prefetch this host's assets (latest)
  {PROG} --asset-version 0.22.0 pull --language python
  {PROG} --mirror http://10.0.0.5:5000/assets --trusted-key release.pub pull
  {PROG} versions ghcr.io/dualeai/exec-sandbox-assets
  {PROG} status --json
  {PROG} verify --full
  {PROG} gc --dry-run --keep 2
  {PROG} inspect docker://ghcr.io/dualeai/exec-sandbox-assets:v0.22.0
  {PROG} mirror ghcr.io/dualeai/exec-sandbox-assets oci-archive:assets.tar --version 0.22.0
  {PROG} keygen --out release && {PROG} publish --help
  source <({PROG} completion bash)

{EXIT_CODES_HELP}
Run '{PROG} COMMAND --help' for a command's options and examples."""


class UsageExit(SystemExit):
    """A usage error the parser found (and printed): exit code 2, and its message."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_USAGE)
        self.message = message


def parse_failed(exc: SystemExit, argv: Sequence[str]) -> int:
    """The exit code of a parse that ended (--help, --version, a usage error). A usage
    error of a `--json` command line is also the failure document on stdout."""
    sys.stdout.flush()
    if isinstance(exc, UsageExit) and "--json" in argv:
        error = ConfigError(exc.message)
        emit_json(json_result({}, [Failure(error, exit_code=EXIT_USAGE)]))
    return exc.code if isinstance(exc.code, int) else EXIT_USAGE


class Parser(argparse.ArgumentParser):
    """argparse, with "did you mean" for a mistyped command."""

    def error(self, message: str) -> NoReturn:
        if "invalid choice:" in message and "argument COMMAND" in message:
            word = message.split("invalid choice:", 1)[1].split("'")[1]
            close = difflib.get_close_matches(word, [c.name for c in COMMANDS], n=3, cutoff=0.5)
            if close:
                message = f"unknown command {word!r}; did you mean {' or '.join(close)}?"
            else:
                names = ", ".join(c.name for c in COMMANDS)
                message = f"unknown command {word!r}; the commands are: {names}"
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise UsageExit(message)


def build_parser() -> argparse.ArgumentParser:
    from exec_sandbox_assets import __version__

    parser = Parser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "-V",
        "--version",
        "--program-version",
        action="version",
        version=f"%(prog)s {__version__}",
        help="print the program version and exit (the release to use: --asset-version)",
    )
    arguments.add_global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        examples = "\n".join(f"  {PROG} {e}" for e in command.examples)
        p = sub.add_parser(
            command.name,
            help=command.help,
            description=command.description,
            epilog=f"examples:\n{examples}\n\n{EXIT_CODES_HELP}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            add_help=not command.own_parser,
            allow_abbrev=False,
        )
        command.add_arguments(p)
        if command.own_parser:
            continue
        if command.json:
            arguments.add_json(p)
        if command.registry:
            arguments.add_registry_login(p, command.registry)
        arguments.add_global_options(p, suppress=True)
    return parser


def command_index(parser: argparse.ArgumentParser, argv: Sequence[str]) -> int | None:
    """Where the command word is in `argv` (global options and their values skipped)."""
    skip = False
    for i, word in enumerate(argv):
        if skip:
            skip = False
            continue
        if word == "--":
            return i + 1 if i + 1 < len(argv) else None
        if word.startswith("-") and len(word) > 1:
            action = parser._option_string_actions.get(word)
            skip = "=" not in word and action is not None and action.nargs != 0
            continue
        return i
    return None


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Explicit options win over the environment (`config.load_settings`). Every source
    reference is parsed here, so a bad one is a usage error (2) whatever the command."""
    from exec_sandbox_assets.oci.reference import parse_source_ref

    settings = load_settings(
        cache_dir=args.cache_dir,
        version=args.asset_version,
        registry=args.registry if args.command != "demo" else None,
        mirrors=tuple(args.mirror) if args.mirror else None,
        trusted_keys=tuple(args.trusted_key) if args.trusted_key else None,
        trusted_workflows=(
            tuple(w for w in args.trusted_workflow if w.strip()) if args.trusted_workflow else None
        ),
        sigstore_root=args.sigstore_root,
        offline=True if args.offline else None,
        airgap=True if args.airgap else None,
        insecure_skip_verify=True if args.insecure_skip_verify else None,
        ca_bundle=args.ca_bundle,
        progress_bars=False if args.no_progress or args.quiet else None,
    )
    for text in (*settings.mirrors, settings.registry):
        parse_source_ref(text)
    return settings


__all__ = ["PROG", "Parser", "build_parser", "command_index", "settings_from_args"]
