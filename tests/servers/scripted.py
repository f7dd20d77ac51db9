"""Hostile HTTP servers on loopback: they answer what a test scripts, byte for byte.

`HostileServer` maps request paths to `Answer`s: any status line (a reason phrase
with terminal escapes included), any headers (a `Content-Encoding` it did not apply
for, a `Location` to a host the client must never reach), a body that is a
decompression bomb, and delivery faults a well-behaved server never shows: silence
before the head (`stall`) and a body trickled a few bytes at a time (`trickle`).
Unknown paths get 404. `requests` logs every request (see `servers.RequestRecord`).

Everything binds to 127.0.0.1 only. Style and lifecycle as in tests/servers.py.
"""

from __future__ import annotations

import gzip
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import cast

import zstandard

from servers.common import RequestRecord
from servers.threaded import QuietHandler, ThreadedServer, TrackingHTTPServer


@dataclass(frozen=True)
class Answer:
    """One scripted response. `headers` are sent as given, plus Content-Length (of
    `body`) unless `headers` has one."""

    status: int = 200
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    reason: str = "Whatever"
    stall: float = 0.0  # seconds of silence before the status line
    trickle: tuple[int, float] | None = None  # (bytes per write, seconds between writes)


def zstd_bomb(size: int) -> bytes:
    """A zstd frame of a few KiB that inflates to `size` zero bytes."""
    chunk = bytes(1 << 20)
    compressor = zstandard.ZstdCompressor(level=19).compressobj()
    parts = [compressor.compress(chunk) for _ in range(size >> 20)]
    return b"".join([*parts, compressor.flush()])


def gzip_bomb(size: int) -> bytes:
    """A gzip member about size/1000 bytes long that inflates to `size` zero bytes."""
    return gzip.compress(bytes(size), compresslevel=9)


class _HostileHandler(QuietHandler):
    def _owner(self) -> HostileServer:
        return cast(HostileServer, cast(TrackingHTTPServer, self.server).owner)

    def do_GET(self) -> None:
        self._answer()

    def do_HEAD(self) -> None:
        self._answer()

    def _answer(self) -> None:
        owner = self._owner()
        path = urllib.parse.urlsplit(self.path).path
        record = RequestRecord(self.command, self.path, self._headers_dict())
        owner.requests.append(record)
        answer = owner.routes.get(path, Answer(404, b"not here\n", reason="Not Found"))
        record.status = answer.status
        if answer.stall and owner.stopping.wait(answer.stall):
            return
        head = [f"HTTP/1.1 {answer.status} {answer.reason}"]
        head += [f"{name}: {value}" for name, value in answer.headers]
        if not any(name.lower() == "content-length" for name, _ in answer.headers):
            head.append(f"Content-Length: {len(answer.body)}")
        self.close_connection = True  # one request per connection: simpler to reason about
        head.append("Connection: close")
        try:
            self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
            if self.command == "HEAD":
                return
            if answer.trickle is None:
                self.wfile.write(answer.body)
                return
            step, pause = answer.trickle
            for start in range(0, len(answer.body), step):
                self.wfile.write(answer.body[start : start + step])
                self.wfile.flush()
                if owner.stopping.wait(pause):
                    return
        except OSError:
            pass  # the client gave up on us: that is what most tests want


class HostileServer(ThreadedServer):
    """Answers each path with its scripted `Answer` (`route`); 404 for the rest."""

    _handler = _HostileHandler

    def __init__(self) -> None:
        super().__init__()
        self.routes: dict[str, Answer] = {}
        self.requests: list[RequestRecord] = []
        self.stopping = threading.Event()  # wakes stalled and trickling handlers

    def route(self, path: str, answer: Answer) -> str:
        """Serve `answer` at `path`; returns its URL."""
        self.routes[path] = answer
        return self.url_for(path)

    def url_for(self, path: str) -> str:
        return f"{self.url}/{path.lstrip('/')}"

    def stop(self) -> None:
        self.stopping.set()
        super().stop()

    close = stop

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> None:
        end = time.monotonic() + timeout
        while len(self.requests) < n and time.monotonic() < end:
            time.sleep(0.01)
