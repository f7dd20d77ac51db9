"""Servers that misbehave on purpose, to play what no real registry or CDN does: a CDN
that challenges for credentials, and a raw HTTP/1.1 server whose answers are bytes a
test writes (endless bodies, lying lengths)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import cast

from servers.common import LOOPBACK
from servers.threaded import QuietHandler, ThreadedServer, TrackingHTTPServer


class _HostileCdnHandler(QuietHandler):
    def do_GET(self) -> None:
        owner = cast(HostileCdn, cast(TrackingHTTPServer, self.server).owner)
        owner.seen.append((self.path, self.headers.get("Authorization")))
        body = b'{"errors":[{"code":"DENIED","message":"cdn says no"}]}'
        realm = f"http://{self.headers['Host']}/steal"
        self._send_simple(
            401,
            body,
            [("WWW-Authenticate", f'Bearer realm="{realm}",service="x",scope="y"')],
        )


class HostileCdn(ThreadedServer):
    """A blob CDN that answers 401 with a Bearer challenge whose realm is itself: a
    client answering it would hand the registry's credentials to this host.
    ``seen`` logs (path, Authorization header or None) of every GET."""

    _handler = _HostileCdnHandler

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str | None]] = []


RawHandler = Callable[[socket.socket, str, dict[str, str], "RawServer"], None]


class RawServer:
    """Loopback HTTP/1.1 server whose answers are raw bytes written by `handler`."""

    def __init__(self, handler: RawHandler) -> None:
        self.handler = handler
        self.sent = 0
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._sock = socket.create_server((LOOPBACK, 0))
        self.url = f"http://{LOOPBACK}:{self._sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> RawServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._sock.close()

    def _serve(self) -> None:
        self._sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                while True:
                    head = b""
                    while b"\r\n\r\n" not in head:
                        data = conn.recv(65536)
                        if not data:
                            return
                        head += data
                    lines = head.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
                    target = lines[0].split(" ")[1]
                    headers = {
                        k.strip().lower(): v.strip()
                        for k, _, v in (line.partition(":") for line in lines[1:])
                    }
                    self.requests.append((target, headers))
                    self.handler(conn, target, headers, self)
            except OSError:
                return

    def send(self, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data)
        self.sent += len(data)


def endless_chunked(conn: socket.socket, server: RawServer, head: bytes, limit: int) -> None:
    """Send `head` (status line + headers, chunked) then chunks until `limit` or a close."""
    server.send(conn, head + b"Transfer-Encoding: chunked\r\n\r\n")
    piece = b"x" * 65536
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
    while server.sent < limit:
        server.send(conn, chunk)
    server.send(conn, b"0\r\n\r\n")
