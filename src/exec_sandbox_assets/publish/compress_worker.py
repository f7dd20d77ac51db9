"""Compression in a child process, so that stopping a publish stops it at once.

zstd's threads cannot be interrupted: a stop flag checked between chunks still leaves
the jobs already handed to them (up to a few of 32 MiB at level 19) to finish, and
freeing a compressor waits for them with the GIL held, which stalls every thread of the
process (measured on this project's 2 busy cores: 64 MiB handed over at level 19 took
75 s to finish; freeing the compressor instead blocked the main thread for 80 s). A
killed process stops at once. Files below `WORKER_MIN_SIZE` are compressed in the
publishing process: a fraction of a second even at level 19, no process to start.

Protocol, one job at a time: the parent writes a JSON line `{"src", "dest", "level"}`
to the child's stdin; the child answers on stdout with lines `progress N` (input bytes
compressed since the previous line), then `blob <base64 pickle>` (the `Blob`) or `error
<base64 pickle>` (the exception). Pickle is fine here: both ends are this package, over
pipes only they hold. EOF on stdin ends the child. The child ignores SIGINT (Ctrl-C
reaches the whole process group): the parent decides, and kills it.

    python -m exec_sandbox_assets.publish.compress_worker    # what the parent starts
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

from exec_sandbox_assets.base.errors import AssetError
from exec_sandbox_assets.publish.compress import Blob, OnBytes, compress_cached

# Inputs at least this large are compressed in the child (see the module docstring).
WORKER_MIN_SIZE = 1 << 20


class WorkerStopped(Exception):
    """The worker was killed (`CompressWorker.kill`) before the blob was made."""


class CompressWorker:
    """The parent's end: one child process, started on first use (or by `start`, to
    overlap its start-up with other work), compressing one file at a time."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._killed = False

    def start(self) -> None:
        with self._lock:
            if self._proc is None and not self._killed:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", __name__],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    env=_child_env(),
                )

    def compress(self, src: Path, dest: Path, level: int, on_bytes: OnBytes | None = None) -> Blob:
        """`compress_cached(src, dest, level, on_bytes)`, in the child."""
        self.start()
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdout is None:
            raise WorkerStopped(str(src))
        job = {"src": str(src), "dest": str(dest), "level": level}
        answer: object = None
        try:
            proc.stdin.write(json.dumps(job).encode() + b"\n")
            proc.stdin.flush()
            while line := proc.stdout.readline():
                kind, _, value = line.rstrip(b"\n").partition(b" ")
                if kind == b"progress" and on_bytes is not None:
                    on_bytes(int(value))
                elif kind in (b"blob", b"error"):
                    answer = pickle.loads(base64.b64decode(value))  # noqa: S301 (our own child)
                    break
        except BrokenPipeError:
            pass  # the child is gone: said below
        except BaseException:
            self.kill()  # a stop raised by on_bytes: the child must not go on
            _remove_temps(dest)
            raise
        if isinstance(answer, BaseException):
            raise answer
        if isinstance(answer, Blob):
            return answer
        # End of output without an answer: the child was killed, or died.
        code = proc.wait()
        _remove_temps(dest)
        if self._killed:
            raise WorkerStopped(str(src))
        raise AssetError(f"compressing {src}: the compression process ended with code {code}")

    def kill(self) -> None:
        """Stop now, a compression under way included; `compress` then raises WorkerStopped."""
        with self._lock:
            self._killed = True
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()

    def close(self) -> None:
        """End the child (at once when killed, else once its job is done) and its pipes."""
        with self._lock:
            proc, self._proc, self._killed = self._proc, None, True
        if proc is None:
            return
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()
        proc.wait()


def _child_env() -> dict[str, str]:
    """The environment with this very package first on the child's path (a test or an
    embedding may have imported it from a path the child would not search)."""
    root = str(Path(__file__).resolve().parents[2])  # the directory holding the package
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _remove_temps(dest: Path) -> None:
    """The temp files a killed child left for `dest` and its record (fsutil.temp_beside)."""
    for temp in dest.parent.glob(f".tmp-*-{dest.name}*"):
        temp.unlink(missing_ok=True)


def _answer(out: IO[bytes], kind: bytes, value: object) -> None:
    try:
        data = pickle.dumps(value)
    except Exception:  # an exception that does not pickle: its text still does
        data = pickle.dumps(AssetError(f"{type(value).__name__}: {value}"))
    out.write(kind + b" " + base64.b64encode(data) + b"\n")
    out.flush()


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = sys.stdout.buffer

    def progress(nbytes: int) -> None:
        out.write(b"progress %d\n" % nbytes)
        out.flush()

    for line in sys.stdin.buffer:
        job = json.loads(line)
        try:
            blob = compress_cached(Path(job["src"]), Path(job["dest"]), int(job["level"]), progress)
        except Exception as exc:  # handed to the parent, which raises it
            _answer(out, b"error", exc)
        else:
            _answer(out, b"blob", blob)
    return 0


__all__ = ["WORKER_MIN_SIZE", "CompressWorker", "WorkerStopped", "main"]


if __name__ == "__main__":
    sys.exit(main())
