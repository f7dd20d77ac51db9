"""`exec-sandbox-assets`: fetch, inspect, check, copy and publish exec-sandbox VM assets.

Only the run of a command lives here: parse (`parser`), set up logging (`logs`), build
the settings when the command's entry in the table (`table.COMMANDS`) says it needs
them, call its handler, and map what it raised to one message and an exit code
(`output`). `publish` is the publisher's own CLI, mounted lazily. `rich` is imported
only to draw progress bars on a terminal (`progress`); the library never imports this
package.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from exec_sandbox_assets.base.errors import AssetError
from exec_sandbox_assets.cli.arguments import merge_global_options
from exec_sandbox_assets.cli.logs import restore_logging, setup_logging
from exec_sandbox_assets.cli.output import (
    EXIT_BROKEN_PIPE,
    EXIT_USAGE,
    err,
    exit_code_for,
    report_error,
    report_interrupted,
)
from exec_sandbox_assets.cli.parser import (
    PROG,
    build_parser,
    command_index,
    parse_failed,
    settings_from_args,
)
from exec_sandbox_assets.cli.progress import LogHandler, Ui
from exec_sandbox_assets.cli.startup import skip_unused_imports
from exec_sandbox_assets.cli.table import BY_NAME, Context

# Kept importable from here (tests, scripts written against the earlier layout).
_merge_global_options = merge_global_options

log = logging.getLogger(__name__)


def run_publish(ctx: Context) -> int:
    """`publish ARGS`: the publisher's own parser and run (needs the 'publish' extra)."""
    try:
        from exec_sandbox_assets.cli import publish as publish_cli
    except ImportError as exc:
        err(
            f"error: the publisher needs the 'publish' extra "
            f"(pip install 'exec-sandbox-assets[publish]'): {exc}"
        )
        return EXIT_USAGE
    parser = publish_cli.build_parser(prog=f"{PROG} publish")
    # Output options given before `publish` reach its parser too.
    args = ctx.args
    flags = ["-v"] * args.verbose + ["--quiet"] * args.quiet + ["--no-progress"] * args.no_progress
    try:
        own = parser.parse_args([*flags, *args.rest])
    except SystemExit as exc:  # --help or a usage error, already printed
        return parse_failed(exc, args.rest)
    return publish_cli.run(own)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (see EXIT_CODES_HELP).

    Without `argv` this is the process's own command line (the console script,
    `python -m`): modules it never uses are then made unimportable (`cli.startup`).
    """
    if argv is None:
        skip_unused_imports()
        argv = sys.argv[1:]
    else:
        argv = list(argv)
    parser = build_parser()
    rest: list[str] = []
    at = command_index(parser, argv)
    if at is not None and argv[at] in BY_NAME and BY_NAME[argv[at]].own_parser:
        argv, rest = argv[: at + 1], argv[at + 1 :]
    try:
        try:
            args = merge_global_options(parser.parse_args(argv))
        except SystemExit as exc:  # --help, --version, usage errors: argparse printed them
            return parse_failed(exc, argv)
        args.rest = rest
        log_handler, saved = setup_logging(args.verbose, args.quiet)
        try:
            code = _run(args, log_handler)
            sys.stdout.flush()  # here, where a closed pipe is still ours to handle
            return code
        finally:
            restore_logging(log_handler, saved)
    except BrokenPipeError:
        return _broken_pipe()


def _broken_pipe() -> int:
    """The reader of stdout went away (`| head`): stop quietly, as other CLIs do. Python
    would otherwise print an exception while flushing stdout at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a real file (tests capture it)
        pass
    return EXIT_BROKEN_PIPE


def _run(args: argparse.Namespace, log_handler: LogHandler) -> int:
    command = BY_NAME[args.command]
    as_json = bool(getattr(args, "json", False))
    try:
        settings = settings_from_args(args) if command.settings else None
        ui = (
            Ui(
                args.quiet,
                settings.progress_bars and not args.no_progress,
                settings.progress_interval,
            )
            if settings is not None
            else Ui(args.quiet, not args.no_progress)
        )
        return command.load()(Context(args, ui, log_handler, settings))
    except KeyboardInterrupt:
        return report_interrupted(
            "interrupted: partial downloads are kept; running the command again resumes them",
            as_json,
        )
    except BrokenPipeError:
        raise
    except (AssetError, OSError, ValueError) as exc:
        log.debug("command failed", exc_info=True)
        return report_error(exc, exit_code_for(exc), as_json)


__all__ = ["build_parser", "main", "run_publish", "settings_from_args"]


if __name__ == "__main__":
    sys.exit(main())
