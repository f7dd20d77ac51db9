"""In-process stdlib HTTP servers: a thread, a start()/stop() lifecycle, and a stop()
that also cuts keep-alive connections. The base of TokenServer, StaticServer and the
hostile servers."""

from __future__ import annotations

import contextlib
import http.server
import socket
import socketserver
import threading
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Self

from servers.common import LOOPBACK


class TrackingHTTPServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer that remembers open connections so stop() can cut
    keep-alive handlers blocked in recv (shutdown() alone leaves them hanging)."""

    daemon_threads = True
    owner: Any

    def __init__(self, owner: Any, handler: type[http.server.BaseHTTPRequestHandler]) -> None:
        self.owner = owner
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__((LOOPBACK, 0), handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn): skip the lookup.
        socketserver.TCPServer.server_bind(self)
        self.server_name = LOOPBACK
        self.server_port = int(self.socket.getsockname()[1])

    def process_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        if isinstance(request, socket.socket):
            with self._conns_lock:
                self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: socket.socket | tuple[bytes, socket.socket]) -> None:
        if isinstance(request, socket.socket):
            with self._conns_lock:
                self._conns.discard(request)
        super().shutdown_request(request)

    def cut_all(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class ThreadedServer:
    """start()/stop()/context-manager lifecycle around a TrackingHTTPServer."""

    _handler: type[http.server.BaseHTTPRequestHandler]

    def __init__(self) -> None:
        self._httpd: TrackingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None

    def start(self) -> Self:
        if self._httpd is not None:
            return self
        httpd = TrackingHTTPServer(self, self._handler)
        self._httpd = httpd
        self._port = int(httpd.server_address[1])
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{type(self).__name__}:{self._port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.cut_all()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    close = stop

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{type(self).__name__} not started")
        return self._port

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"


class QuietHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like real servers

    def log_message(self, format: str, *args: Any) -> None:
        # Per-request stderr lines only add noise to pytest output; servers keep logs.
        pass

    def _headers_dict(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            out[key] = f"{out[key]}, {value}" if key in out else value
        return out

    def _send_simple(
        self, status: int, body: bytes = b"", headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)
