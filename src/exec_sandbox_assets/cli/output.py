"""Exit codes, error classification and plain-text formatting shared by the CLI commands.

Stdlib only: the CLI imports `rich` solely to draw progress on a terminal.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exec_sandbox_assets.base.errors import (
    AllSourcesFailedError,
    AssetError,
    AssetNotFoundError,
    ConfigError,
    TrustError,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TRUST = 3
EXIT_NOT_FOUND = 4
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what `cat` reports when `| head` stops reading

EXIT_CODES_HELP = """\
exit codes:
  0    success
  1    the operation failed (network, registry, disk, ...)
  2    bad usage or configuration (arguments, references, key files, settings)
  3    verification or trust failure (signature, digest, size, version, rollback)
  4    not found (tag, file, or an offline/air-gapped miss)
  130  interrupted (partial downloads are kept; a re-run resumes)
  141  stdout was closed early (`| head`): stopped quietly
"""


def exit_code_for(exc: BaseException) -> int:
    """The exit code an error maps to (see EXIT_CODES_HELP)."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, ConfigError):
        return EXIT_USAGE
    if isinstance(exc, TrustError):
        return EXIT_TRUST
    if isinstance(exc, AllSourcesFailedError):
        return EXIT_NOT_FOUND if exc.not_found else EXIT_FAILED
    if isinstance(exc, AssetNotFoundError | FileNotFoundError):
        return EXIT_NOT_FOUND
    return EXIT_FAILED


def error_message(exc: BaseException) -> str:
    """The whole message of an error, never cut. An OSError from the filesystem names the
    path first ("/var/cache/x: Not a directory") instead of Python's "[Errno 20] ..."."""
    if isinstance(exc, OSError) and not isinstance(exc, AssetError) and exc.strerror:
        where = exc.filename if exc.filename is not None else ""
        if exc.filename2 is not None:
            where = f"{where} -> {exc.filename2}"
        return f"{where}: {exc.strerror}" if where else exc.strerror
    return str(exc).strip() or type(exc).__name__


@dataclass(frozen=True)
class Failure:
    """One failure and every file it failed: a release-level one (tag missing, signature
    refused, every source down) fails all of them with the same error, once; one that
    stopped the whole command names no file."""

    error: BaseException
    names: tuple[str, ...] = ()
    exit_code: int | None = None  # None: the error's own (`exit_code_for`)

    @property
    def release_level(self) -> bool:
        return len(self.names) > 1

    @property
    def scope(self) -> str:
        if not self.names:
            return "command"
        return "release" if self.release_level else "file"

    def to_json(self) -> dict[str, Any]:
        """One entry of a `--json` document's `errors` (docs/cli.md, "JSON output")."""
        doc: dict[str, Any] = {
            "scope": self.scope,
            "files": list(self.names),
            "error": error_message(self.error),
            "type": type(self.error).__name__,
            "exit_code": exit_code_for(self.error) if self.exit_code is None else self.exit_code,
        }
        if self.scope == "file":
            doc["name"] = self.names[0]
        return doc


def group_failures(failures: Iterable[tuple[str, BaseException]]) -> list[Failure]:
    """(file, error) pairs grouped by error: the same exception object, or one of the same
    type and message (a release-level error raised once per file), in first-seen order."""
    groups: dict[tuple[str, str], list[tuple[str, BaseException]]] = {}
    for name, exc in failures:
        key = (type(exc).__name__, error_message(exc))
        groups.setdefault(key, []).append((name, exc))
    return [Failure(pairs[0][1], tuple(n for n, _ in pairs)) for pairs in groups.values()]


def json_result(fields: dict[str, Any], failures: Iterable[Failure] = ()) -> dict[str, Any]:
    """The one shape of every `--json` document: `ok` first, the command's own fields,
    then `errors` (empty when it succeeded)."""
    errors = [f.to_json() for f in failures]
    return {"ok": not errors, **fields, "errors": errors}


def report_error(exc: BaseException, code: int, as_json: bool) -> int:
    """A command's failure: one `error:` message on stderr, and with --json the document
    scripts read instead of the result. Returns `code`."""
    err(f"error: {error_message(exc)}")
    if as_json:
        emit_json(json_result({}, [Failure(exc, exit_code=code)]))
    return code


def report_interrupted(message: str, as_json: bool) -> int:
    """Ctrl-C: `message` on stderr (what was kept), and with --json the failure document."""
    err(message)
    if as_json:
        emit_json(json_result({}, [Failure(KeyboardInterrupt(message))]))
    return EXIT_INTERRUPTED


def worst_exit_code(errors: Iterable[BaseException]) -> int:
    """One exit code for several failures: trust beats usage beats failure beats not-found."""
    codes = {exit_code_for(e) for e in errors}
    for code in (EXIT_INTERRUPTED, EXIT_TRUST, EXIT_USAGE, EXIT_FAILED, EXIT_NOT_FOUND):
        if code in codes:
            return code
    return EXIT_OK


def human_size(n: int) -> str:
    """1536 -> '1.5 KiB' (binary units; bytes exact)."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def short_digest(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    return f"{algo}:{hexpart[:12]}" if hexpart else digest


def jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def emit_json(doc: Any) -> None:
    """The one JSON document of a `--json` command, on stdout."""
    sys.stdout.write(json.dumps(jsonable(doc), indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


def out(line: str = "") -> None:
    sys.stdout.write(line + "\n")


def err(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def table(rows: Iterable[tuple[str, ...]], indent: str = "  ") -> list[str]:
    """Left-aligned columns (the last column is not padded)."""
    rows = list(rows)
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(map(len, rows)))]
    lines = []
    for row in rows:
        cells = [c.ljust(widths[i]) if i < len(row) - 1 else c for i, c in enumerate(row)]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_CODES_HELP",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_TRUST",
    "EXIT_USAGE",
    "Failure",
    "emit_json",
    "err",
    "error_message",
    "exit_code_for",
    "group_failures",
    "human_size",
    "json_result",
    "jsonable",
    "out",
    "report_error",
    "report_interrupted",
    "short_digest",
    "table",
    "worst_exit_code",
]
