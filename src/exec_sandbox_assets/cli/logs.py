"""Logging for the command line: one handler on stderr (through the progress console
while bars are live), `level: message (key=value, ...)` lines, chatty libraries quieted."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from exec_sandbox_assets.cli.progress import LogHandler

_STANDARD_RECORD_FIELDS = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))
) | {"message", "asctime", "taskName"}


class Formatter(logging.Formatter):
    """`level: message (key=value, ...)`: the library's structured `extra=` fields shown."""

    def __init__(self, verbose: bool) -> None:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "%(message)s"
        super().__init__(fmt)
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not self.verbose:
            text = f"{record.levelname.lower()}: {text}"
        # A field the message already says (the error of a warning) is not said twice.
        message = record.getMessage()
        extras = {
            k: v
            for k, v in vars(record).items()
            if k not in _STANDARD_RECORD_FIELDS and str(v) not in message
        }
        if extras:
            text += " (" + ", ".join(f"{k}={v}" for k, v in extras.items()) + ")"
        return text


@dataclass
class LoggingState:
    level: int
    handlers: list[logging.Handler]
    quiet: dict[str, int]


_CHATTY = ("httpcore", "hpack", "urllib3", "oras")


def setup_logging(verbosity: int, quiet: bool = False) -> tuple[LogHandler, LoggingState]:
    """Route records to stderr: warnings by default, errors only with `quiet`, debug with -v."""
    root = logging.getLogger()
    saved = LoggingState(
        root.level, list(root.handlers), {n: logging.getLogger(n).level for n in _CHATTY}
    )
    handler = LogHandler()
    handler.setFormatter(Formatter(verbose=verbosity > 0))
    for old in root.handlers:
        if isinstance(old, LogHandler | logging.StreamHandler) and not _is_capture(old):
            root.removeHandler(old)
    root.addHandler(handler)
    if verbosity > 0:
        root.setLevel(logging.DEBUG)
    else:
        root.setLevel(logging.ERROR if quiet else logging.WARNING)
    if verbosity < 2:
        for name in _CHATTY:
            logging.getLogger(name).setLevel(logging.WARNING)
    return handler, saved


def _is_capture(handler: logging.Handler) -> bool:
    # pytest's LogCaptureHandler is a StreamHandler; leave test machinery alone.
    return type(handler).__module__.startswith("_pytest")


def restore_logging(handler: LogHandler, saved: LoggingState) -> None:
    root = logging.getLogger()
    root.removeHandler(handler)
    for old in saved.handlers:
        if old not in root.handlers:
            root.addHandler(old)
    root.setLevel(saved.level)
    for name, level in saved.quiet.items():
        logging.getLogger(name).setLevel(level)


__all__ = ["Formatter", "LoggingState", "restore_logging", "setup_logging"]
