"""Progress of the CLI: bars on a terminal, plain lines everywhere else.

On a terminal, one bar per file (bytes, rate, time left) and one overall (`rich`,
imported only when a bar is actually drawn: not on a pipe, not in the library); without
`rich` (the `cli` extra), a terminal gets a line when a file starts and one when it is
done. Off a terminal (CI logs, `2> file`) a line every few seconds says how far the whole
is, how fast it goes and which file is under way (`LineProgress`), as docker and
huggingface-cli do. All implement `client.Progress` (start/advance/finish). `Ui` holds
what the user chose: --quiet, --no-progress or EXEC_SANDBOX_DISABLE_PROGRESS_BARS=1, and
the interval (EXEC_SANDBOX_PROGRESS_INTERVAL).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Any, Protocol

from exec_sandbox_assets.config import DEFAULT_PROGRESS_INTERVAL

OVERALL = "all files"


def want_progress(stream: IO[str] | None = None) -> bool:
    """Bars only where a human watches: stderr is a terminal, and TERM is not `dumb`."""
    stream = sys.stderr if stream is None else stream
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        return False
    return tty and os.environ.get("TERM", "") != "dumb"


@dataclass(frozen=True)
class Ui:
    """Output choices of one command run."""

    quiet: bool = False  # errors (and --json) only
    progress: bool = True  # False: --no-progress, --quiet or the environment said so
    interval: float = DEFAULT_PROGRESS_INTERVAL  # seconds between lines off a terminal

    @property
    def shows_progress(self) -> bool:
        return self.progress and not self.quiet


class ProgressDisplay(Protocol):
    def start(self, name: str, total: int) -> None: ...

    def advance(self, name: str, nbytes: int) -> None: ...

    def finish(self, name: str) -> None: ...


class LogHandler(logging.Handler):
    """Log records to stderr; while bars are live, through their console (no garbling)."""

    def __init__(self) -> None:
        super().__init__()
        self.console: Any | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            if self.console is not None:
                self.console.print(message, markup=False, highlight=False, soft_wrap=True)
            else:
                sys.stderr.write(message + "\n")
                sys.stderr.flush()
        except Exception:
            self.handleError(record)


class TerminalProgress:
    """Rich bars for downloads; counts are clamped so a resumed download never shows >100%."""

    def __init__(self, stream: IO[str], log_handler: LogHandler | None = None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TaskID,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.table import Column

        self._console = Console(file=stream)
        # Numbers never wrap; on a narrow terminal the bar shrinks, then the name is cut.
        width = self._console.width
        self._bars = Progress(
            TextColumn(
                "{task.description}",
                table_column=Column(
                    no_wrap=True, overflow="ellipsis", max_width=max(12, width - 50)
                ),
            ),
            BarColumn(bar_width=max(5, min(30, width - 85))),
            TaskProgressColumn(table_column=Column(no_wrap=True)),
            DownloadColumn(binary_units=True, table_column=Column(no_wrap=True)),
            TransferSpeedColumn(table_column=Column(no_wrap=True)),
            TimeRemainingColumn(table_column=Column(no_wrap=True)),
            console=self._console,
            refresh_per_second=8,
        )
        self._log_handler = log_handler
        self._tasks: dict[str, TaskID] = {}
        self._totals: dict[str, int] = {}
        self._done: dict[str, int] = {}
        self._overall: TaskID | None = None

    def __enter__(self) -> TerminalProgress:
        self._bars.start()
        if self._log_handler is not None:
            self._log_handler.console = self._console
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._bars.stop()
        if self._log_handler is not None:
            self._log_handler.console = None

    def _sync_overall(self) -> None:
        if self._overall is None:
            # Added with the first file, so it is drawn first.
            self._overall = self._bars.add_task(OVERALL, total=0)
        self._bars.update(
            self._overall,
            total=sum(self._totals.values()),
            completed=sum(self._done.values()),
        )

    def start(self, name: str, total: int) -> None:
        if name not in self._tasks:
            if self._overall is None:
                self._sync_overall()
            self._tasks[name] = self._bars.add_task(name, total=total)
        self._totals[name] = total
        self._done.setdefault(name, 0)
        self._sync_overall()

    def advance(self, name: str, nbytes: int) -> None:
        if name not in self._tasks:
            self.start(name, nbytes)
        total = self._totals[name]
        done = min(total, self._done[name] + nbytes) if total else self._done[name] + nbytes
        self._done[name] = done
        self._bars.update(self._tasks[name], completed=done)
        self._sync_overall()

    def finish(self, name: str) -> None:
        if name not in self._tasks:
            return
        self._done[name] = self._totals[name]
        self._bars.update(self._tasks[name], completed=self._totals[name])
        self._sync_overall()


class PlainProgress:
    """Progress as plain lines, for a terminal without `rich`: a line when a file starts
    and one when it is done (never one per chunk), each file once."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._totals: dict[str, int] = {}
        self._done: set[str] = set()

    def _line(self, text: str) -> None:
        self._stream.write(text + "\n")
        self._stream.flush()

    def start(self, name: str, total: int) -> None:
        if name not in self._totals:
            self._line(f"{name}: started ({_size(total)})")
        self._totals[name] = total

    def advance(self, name: str, nbytes: int) -> None:
        if name not in self._totals:
            self.start(name, nbytes)

    def finish(self, name: str) -> None:
        if name in self._done:
            return
        self._done.add(name)
        self._line(f"{name}: done ({_size(self._totals.get(name, 0))})")


class LineProgress:
    """Off a terminal: every `interval` seconds while something is under way, one line
    with the bytes done of those known so far, the rate since the previous line, the
    files done and the file under way:

        progress: 12.0 MiB of 60.0 MiB (20%), 2.4 MiB/s, 1 of 3 done; compress raw-base.qcow2

    Printed by a thread of its own, so a long step (a compression finishing, an upload
    of one large blob) still shows the command is alive. Safe to call from several
    threads (the publisher compresses on one and pushes on another)."""

    def __init__(
        self,
        stream: IO[str],
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._totals: dict[str, int] = {}
        self._done: dict[str, int] = {}
        self._finished: set[str] = set()
        self._current = ""
        self._last = (clock(), 0)  # (when, bytes done) at the previous line
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="progress-lines", daemon=True)

    @contextlib.contextmanager
    def ticking(self) -> Iterator[LineProgress]:
        """Print lines while the block runs."""
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()

    def start(self, name: str, total: int) -> None:
        with self._lock:
            self._totals[name] = total
            self._done.setdefault(name, 0)
            self._finished.discard(name)
            self._current = name

    def advance(self, name: str, nbytes: int) -> None:
        with self._lock:
            total = self._totals.setdefault(name, nbytes)
            done = self._done.get(name, 0) + nbytes
            self._done[name] = min(total, done) if total else done
            self._current = name

    def finish(self, name: str) -> None:
        with self._lock:
            self._done[name] = self._totals.get(name, self._done.get(name, 0))
            self._finished.add(name)

    def line(self) -> str | None:
        """The line to print now, or None when nothing is under way."""
        with self._lock:
            if not self._totals or len(self._finished) == len(self._totals):
                return None
            now, done = self._clock(), sum(self._done.values())
            total = sum(self._totals.values())
            then, before = self._last
            self._last = (now, done)
            current = self._current if self._current not in self._finished else ""
            if not current:  # the one named last is done: name one still under way
                current = next((n for n in self._totals if n not in self._finished), "")
            # Never below 0: a download restarted from scratch counts its bytes again.
            rate = max(0.0, (done - before) / (now - then)) if now > then else 0.0
            percent = f" ({100 * done // total}%)" if total else ""
            return (
                f"progress: {_size(done)} of {_size(total)}{percent}, {_size(int(rate))}/s, "
                f"{len(self._finished)} of {len(self._totals)} done; {current}"
            )

    def _tick(self) -> None:
        while not self._stop.wait(self._interval):
            text = self.line()
            if text is None:
                continue
            try:
                self._stream.write(text + "\n")
                self._stream.flush()
            except (OSError, ValueError):  # stderr closed: the command goes on, silent
                return


def _size(n: int) -> str:
    from exec_sandbox_assets.cli.output import human_size

    return human_size(n)


def rich_available() -> bool:
    try:
        import rich.progress  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def progress_display(
    ui: Ui, log_handler: LogHandler | None = None, stream: IO[str] | None = None
) -> Iterator[ProgressDisplay | None]:
    """What shows progress on `stream` (stderr) under `ui`: bars on a terminal (plain
    start/done lines there without `rich`), a line every `ui.interval` seconds elsewhere,
    or None when the user turned progress off (the caller prints a summary only)."""
    if not ui.shows_progress:
        yield None
        return
    stream = sys.stderr if stream is None else stream
    if not want_progress(stream):
        with LineProgress(stream, ui.interval).ticking() as lines:
            yield lines
        return
    if not rich_available():
        yield PlainProgress(stream)
        return
    with TerminalProgress(stream, log_handler) as bars:
        yield bars


__all__ = [
    "OVERALL",
    "LineProgress",
    "LogHandler",
    "PlainProgress",
    "ProgressDisplay",
    "TerminalProgress",
    "Ui",
    "progress_display",
    "rich_available",
    "want_progress",
]
