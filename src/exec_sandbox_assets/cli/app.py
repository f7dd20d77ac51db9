"""`exec-sandbox-assets`: fetch, inspect, check, copy and publish exec-sandbox VM assets.

Only the command line lives here: parsing, settings, logging, exit codes. The commands
are in `cli_commands` (pull, status, verify, gc, keygen), `cli_inspect`, `cli_mirror`
and `cli_demo`; `publish` is the publisher's own CLI, mounted lazily. `rich` is imported
only to draw progress bars on a terminal (`cli_progress`); the library never imports
this module.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exec_sandbox_assets.cli.output import (
    EXIT_CODES_HELP,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    emit_json,
    err,
    exit_code_for,
)
from exec_sandbox_assets.cli.progress import LogHandler
from exec_sandbox_assets.config import Settings, load_settings
from exec_sandbox_assets.errors import AssetError

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
  {PROG} status --json
  {PROG} verify --full
  {PROG} gc --dry-run --keep 2
  {PROG} inspect docker://ghcr.io/dualeai/exec-sandbox-assets:v0.22.0
  {PROG} mirror ghcr.io/dualeai/exec-sandbox-assets oci-archive:assets.tar --version 0.22.0
  {PROG} keygen --out release && {PROG} publish --help

{EXIT_CODES_HELP}
Run '{PROG} COMMAND --help' for a command's options and examples."""


# -- logging -----------------------------------------------------------------------------------

_STANDARD_RECORD_FIELDS = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))
) | {"message", "asctime", "taskName"}


class _Formatter(logging.Formatter):
    """`level: message (key=value, ...)`: the library's structured `extra=` fields shown."""

    def __init__(self, verbose: bool) -> None:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "%(message)s"
        super().__init__(fmt)
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not self.verbose:
            text = f"{record.levelname.lower()}: {text}"
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD_RECORD_FIELDS}
        if extras:
            text += " (" + ", ".join(f"{k}={v}" for k, v in extras.items()) + ")"
        return text


@dataclass
class _LoggingState:
    level: int
    handlers: list[logging.Handler]
    quiet: dict[str, int]


_CHATTY = ("httpcore", "hpack", "urllib3", "oras")


def _setup_logging(verbosity: int) -> tuple[LogHandler, _LoggingState]:
    root = logging.getLogger()
    saved = _LoggingState(
        root.level, list(root.handlers), {n: logging.getLogger(n).level for n in _CHATTY}
    )
    handler = LogHandler()
    handler.setFormatter(_Formatter(verbose=verbosity > 0))
    for old in root.handlers:
        if isinstance(old, LogHandler | logging.StreamHandler) and not _is_capture(old):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbosity > 0 else logging.WARNING)
    if verbosity < 2:
        for name in _CHATTY:
            logging.getLogger(name).setLevel(logging.WARNING)
    return handler, saved


def _is_capture(handler: logging.Handler) -> bool:
    # pytest's LogCaptureHandler is a StreamHandler; leave test machinery alone.
    return type(handler).__module__.startswith("_pytest")


def _restore_logging(handler: LogHandler, saved: _LoggingState) -> None:
    root = logging.getLogger()
    root.removeHandler(handler)
    for old in saved.handlers:
        if old not in root.handlers:
            root.addHandler(old)
    root.setLevel(saved.level)
    for name, level in saved.quiet.items():
        logging.getLogger(name).setLevel(level)


# -- parser ------------------------------------------------------------------------------------


_AFTER = "__after_command"


def _add_global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """Settings options. On subcommands (`suppress`) they set nothing unless given, under
    their own names, merged by `_merge_global_options`: `-v pull -v` counts two,
    `--mirror A pull --mirror B` keeps both, a single value given after the command wins."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    first = len(parser._actions)
    g = parser.add_argument_group("settings (each overrides its EXEC_SANDBOX_* variable)")
    g.add_argument(
        "--cache-dir", type=Path, metavar="DIR", default=default(None), help="cache directory"
    )
    # `--version` is an alias on the main parser only: `mirror` and `publish` have their own.
    version_flags = ("--asset-version",) if suppress else ("--asset-version", "--version")
    g.add_argument(
        *version_flags,
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
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default(0),
        help="debug logs on stderr (-vv: HTTP internals too)",
    )
    if suppress:
        for action in parser._actions[first:]:
            action.dest += _AFTER


def _merge_global_options(args: argparse.Namespace) -> argparse.Namespace:
    """Fold options given after the command into those given before it."""
    for key, value in list(vars(args).items()):
        if not key.endswith(_AFTER):
            continue
        delattr(args, key)
        name = key.removesuffix(_AFTER)
        before = getattr(args, name, None)
        if isinstance(value, list) and isinstance(before, list):
            value = before + value
        elif name == "verbose":
            value = (before or 0) + value
        setattr(args, name, value)
    return args


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document on stdout (for scripts)"
    )


def _pull_args(p: argparse.ArgumentParser) -> None:
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
    _add_json(p)


def _status_args(p: argparse.ArgumentParser) -> None:
    _add_json(p)


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--full",
        action="store_true",
        help="re-hash every file against its recorded digest (reads every byte)",
    )
    _add_json(p)


def _gc_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dry-run", action="store_true", help="print what would be freed; delete nothing"
    )
    p.add_argument(
        "--keep", type=int, default=1, metavar="N", help="newest versions to keep (default 1)"
    )
    _add_json(p)


def _inspect_args(p: argparse.ArgumentParser) -> None:
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
    _add_json(p)


def _mirror_args(p: argparse.ArgumentParser) -> None:
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
    _add_json(p)


def _keygen_args(p: argparse.ArgumentParser) -> None:
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


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dir", metavar="DIR", help="work directory (default: a new temporary directory)"
    )
    p.add_argument(
        "--level", type=int, default=3, help="zstd level of the sample release (default 3)"
    )


def _no_args(p: argparse.ArgumentParser) -> None:
    pass


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    description: str
    examples: tuple[str, ...]
    add_arguments: Callable[[argparse.ArgumentParser], None]


COMMANDS: tuple[Command, ...] = (
    Command(
        "pull",
        "prefetch a release's files into the cache",
        "Fetch and verify the kernel(s), initramfs, gvproxy and base images of one\n"
        "platform (default: this host) for the asset version, into the cache.",
        (
            "pull",
            "--asset-version 0.22.0 pull --arch aarch64 --language python",
            "pull --from oci-archive:/media/usb/assets.tar --trusted-key release.pub",
            "pull --json | jq -r '.files[].path'",
        ),
        _pull_args,
    ),
    Command(
        "status",
        "show cached versions, files, partial downloads",
        "Show what the cache holds: versions, files, sizes, whether each still matches\n"
        "its verification record (a stat, no hashing), where it came from, partials.",
        ("status", "status --json", "--cache-dir /var/cache/exec-sandbox status"),
        _status_args,
    ),
    Command(
        "verify",
        "re-check cached files (exit 3 on a mismatch)",
        "Check every cached file against its verification record (stat), or re-hash\n"
        "its content (--full). Exits 3 naming each file that does not match.",
        ("verify", "verify --full", "--asset-version 0.22.0 verify --full --json"),
        _verify_args,
    ),
    Command(
        "gc",
        "free space: old versions, orphan blobs, stale partials",
        "Remove versions older than the newest N (the versions the floating tag and the\n"
        "configured asset version point to are kept), blobs never installed, partial\n"
        "downloads and temp files of interrupted writes. What a running download holds\n"
        "is skipped. --dry-run prints the same plan without deleting.",
        ("gc --dry-run", "gc --keep 2", "gc --json"),
        _gc_args,
    ),
    Command(
        "inspect",
        "show a release's platforms, files and signatures",
        "Show what a reference holds (platforms, files, sizes) and its signatures,\n"
        "and whether they verify with the trusted keys. Reports, never fails on an\n"
        "unverified signature unless --require-signature is given.",
        (
            "inspect docker://ghcr.io/dualeai/exec-sandbox-assets:v0.22.0",
            "--trusted-key release.pub inspect http://127.0.0.1:5000/assets:v0.22.0",
            "inspect oci:/srv/assets:v0.22.0 --json",
            "inspect oci-archive:assets.tar:v0.22.0 --require-signature",
        ),
        _inspect_args,
    ),
    Command(
        "mirror",
        "copy signed releases between registries, layouts and archives",
        "Copy releases from SRC to DST, verifying each signature with the trusted keys\n"
        "before anything is copied; blobs the destination has are skipped, and the tag\n"
        "is written last, so an interrupted mirror never leaves a tag naming an\n"
        "incomplete release (a re-run resumes). Digests and signatures are unchanged.",
        (
            "mirror ghcr.io/dualeai/exec-sandbox-assets oci-archive:assets.tar --version 0.22.0",
            "--trusted-key release.pub mirror ghcr.io/dualeai/exec-sandbox-assets "
            "http://10.0.0.5:5000/assets --version 0.22.0 --version latest",
            "mirror oci:/media/usb/assets registry.internal/exec-sandbox --version 0.22.0",
        ),
        _mirror_args,
    ),
    Command(
        "keygen",
        "create a signing key pair",
        "Write a new signing key: PREFIX.key (private, mode 0600) and PREFIX.pub (the\n"
        "public key clients trust, as `cosign verify --key` takes it). With\n"
        "--password-env NAME the private key is encrypted with the password in $NAME.",
        (
            "keygen --out release",
            "keygen --algorithm ed25519 --out ci --password-env KEY_PASSWORD",
        ),
        _keygen_args,
    ),
    Command(
        "publish",
        "publish a signed release (needs the 'publish' extra)",
        "The publisher: compress build outputs, sign, push to registries, layouts,\n"
        "archives, and write the GitHub Release folder. See 'publish --help'.",
        (
            "publish --input images/dist --version 0.22.0 --key release.key "
            "--to ghcr.io/dualeai/exec-sandbox-assets",
        ),
        _no_args,
    ),
    Command(
        "demo",
        "round trip: sample build, sign, publish, pull back, compare",
        "With no server and no real build: make a sample build, generate a key, publish\n"
        "a signed release into oci:DIR/layout, pull it back through the client with only\n"
        "that layout configured (air-gapped), and check every file is byte-identical.\n"
        "With --registry URL, the same against a running registry.",
        ("demo", "demo --dir /tmp/demo", "demo --registry http://127.0.0.1:5000/demo"),
        _demo_args,
    ),
)


def build_parser() -> argparse.ArgumentParser:
    from exec_sandbox_assets import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "-V", "--program-version", action="version", version=f"%(prog)s {__version__}"
    )
    _add_global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        examples = "\n".join(f"  {PROG} {e}" for e in command.examples)
        p = sub.add_parser(
            command.name,
            help=command.help,
            description=command.description,
            epilog=f"examples:\n{examples}\n\n{EXIT_CODES_HELP}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            add_help=command.name != "publish",
            allow_abbrev=False,
        )
        command.add_arguments(p)
        if command.name != "publish":
            _add_global_options(p, suppress=True)
    return parser


def _command_index(parser: argparse.ArgumentParser, argv: Sequence[str]) -> int | None:
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
        offline=True if args.offline else None,
        airgap=True if args.airgap else None,
        insecure_skip_verify=True if args.insecure_skip_verify else None,
        ca_bundle=args.ca_bundle,
    )
    for text in (*settings.mirrors, settings.registry):
        parse_source_ref(text)
    return settings


def _run_publish(argv: Sequence[str]) -> int:
    try:
        from exec_sandbox_assets.publish import cli as publish_cli
    except ImportError as exc:
        err(
            f"error: the publisher needs the 'publish' extra "
            f"(pip install 'exec-sandbox-assets[publish]'): {exc}"
        )
        return EXIT_USAGE
    parser = publish_cli.build_parser(prog=f"{PROG} publish")
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:  # --help or a usage error, already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return publish_cli.run(args)


def _dispatch(args: argparse.Namespace, settings: Settings, log_handler: LogHandler) -> int:
    from exec_sandbox_assets.cli import commands as cli_commands

    if args.command == "pull":
        return cli_commands.run_pull(args, settings, log_handler)
    if args.command == "status":
        return cli_commands.run_status(args, settings)
    if args.command == "verify":
        return cli_commands.run_verify(args, settings)
    if args.command == "gc":
        return cli_commands.run_gc(args, settings)
    if args.command == "keygen":
        return cli_commands.run_keygen(args)
    if args.command == "inspect":
        from exec_sandbox_assets.cli.inspect import run_inspect

        return run_inspect(args, settings)
    if args.command == "mirror":
        from exec_sandbox_assets.cli.mirror import run_mirror

        return run_mirror(args, settings, log_handler)
    if args.command == "demo":
        from exec_sandbox_assets.cli.demo import run_demo

        return run_demo(args, settings, log_handler)
    raise AssertionError(f"unhandled command {args.command!r}")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (see EXIT_CODES_HELP)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    rest: list[str] | None = None
    at = _command_index(parser, argv)
    if at is not None and argv[at] == "publish":
        argv, rest = argv[: at + 1], argv[at + 1 :]
    try:
        args = _merge_global_options(parser.parse_args(argv))
    except SystemExit as exc:  # --help, -V, usage errors: argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    log_handler, saved = _setup_logging(args.verbose)
    try:
        if rest is not None:
            return _run_publish(rest)
        return _run(args, log_handler)
    finally:
        _restore_logging(log_handler, saved)


def _run(args: argparse.Namespace, log_handler: LogHandler) -> int:
    as_json = bool(getattr(args, "json", False))
    try:
        settings = settings_from_args(args)
        return _dispatch(args, settings, log_handler)
    except KeyboardInterrupt:
        err("interrupted: partial downloads are kept; running the command again resumes them")
        return EXIT_INTERRUPTED
    except (AssetError, OSError, ValueError) as exc:
        code = exit_code_for(exc)
        logging.getLogger(__name__).debug("command failed", exc_info=True)
        err(f"error: {exc}")
        if as_json:
            emit_json(
                {"ok": False, "error": str(exc), "type": type(exc).__name__, "exit_code": code}
            )
        return code


if __name__ == "__main__":
    sys.exit(main())
