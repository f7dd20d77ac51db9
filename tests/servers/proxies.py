"""TCP proxies in front of a server: FaultProxy injects faults into HTTP answers,
TcpRelay passes bytes through (TLS included) and counts connections."""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType
from typing import Literal, Self

from servers.common import LOOPBACK, HasHost, RequestRecord, loopback_upstream
from servers.proxy_connection import Connection, Plan


class FaultProxy:
    """Loopback TCP proxy in front of a plain-HTTP server, injecting faults.

    Set attributes at any time between requests; they apply to requests whose
    head arrives afterwards, and only to requests whose path contains
    ``match_path`` (when set):

    - ``fail_first`` (+ ``fail_status``, ``retry_after``): answer the next K
      requests locally with that status, no upstream contact;
    - ``cut_after_bytes``: close the connection after that many **body** bytes
      of a response were relayed (only if the body is longer), at most
      ``cut_times`` times (None = every time);
    - ``flip_byte_at``: invert the body byte at that offset, at most
      ``flip_times`` times (None = every time);
    - ``stall_seconds``: go silent that long before the response's first byte,
      or before body offset ``stall_after_bytes`` when set; at most
      ``stall_times`` times (None = every time);
    - ``throttle_bytes_per_s``: cap each response's relay rate;
    - ``strip_range``: drop the request's ``Range`` header, so the upstream answers
      200 with the whole body (a proxy or CDN that ignores ranges).

    Body offsets are counted after the response header block, so a test knows
    how many bytes of a blob the client got. ``requests`` logs every request;
    ``bytes_to_client`` counts every byte sent to clients. TLS passes through
    as opaque bytes and cannot be parsed: put the proxy in front of plain HTTP.
    """

    def __init__(self, upstream: str | HasHost) -> None:
        self.upstream_addr = loopback_upstream(upstream)
        self.requests: list[RequestRecord] = []
        self.bytes_to_client = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._conns: set[Connection] = set()
        self._threads: list[threading.Thread] = []
        self._port: int | None = None
        self._reset_faults()

    def _reset_faults(self) -> None:
        self.match_path: str | None = None
        self.fail_first = 0
        self.fail_status = 500
        self.retry_after: str | None = None
        self.cut_after_bytes: int | None = None
        self.cut_times: int | None = None
        self.flip_byte_at: int | None = None
        self.flip_times: int | None = None
        self.stall_seconds = 0.0
        self.stall_after_bytes: int | None = None
        self.stall_times: int | None = None
        self.throttle_bytes_per_s: int | None = None
        self.strip_range = False

    def reset(self) -> None:
        """Clear every fault, the request log and the counters."""
        with self._lock:
            self._reset_faults()
            self.requests.clear()
            self.bytes_to_client = 0
            self.connections = 0

    # -- addresses ------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FaultProxy not started")
        return self._port

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def ref(self, repo: str) -> str:
        return f"{self.url}/{repo}"

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> Self:
        if self._listener is not None:
            return self
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, 0))
        listener.listen(128)
        # Timeout so the accept loop notices close() (closing does not wake accept()).
        listener.settimeout(0.1)
        self._listener = listener
        self._port = int(listener.getsockname()[1])
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"FaultProxy:{self._port}", daemon=True
        )
        self._accept_thread.start()
        return self

    def close(self) -> None:
        self._closing.set()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
            threads = list(self._threads)
        for conn in conns:
            conn.close()
        for t in threads:
            t.join(timeout=5)

    stop = close

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.connections += 1
                conn = Connection(self, client, self.connections)
                self._conns.add(conn)
                t = threading.Thread(
                    target=self._run_conn,
                    args=(conn,),
                    name=f"FaultProxy-c{conn.id}",
                    daemon=True,
                )
                self._threads = [x for x in self._threads if x.is_alive()]
                self._threads.append(t)
            t.start()

    def _run_conn(self, conn: Connection) -> None:
        try:
            conn.serve()
        finally:
            with self._lock:
                self._conns.discard(conn)

    # -- used by connections --------------------------------------------------

    def _log(self, record: RequestRecord) -> None:
        with self._lock:
            self.requests.append(record)

    def _count_to_client(self, n: int) -> None:
        with self._lock:
            self.bytes_to_client += n

    def _plan(self, path: str) -> tuple[tuple[int, str | None] | None, Plan]:
        """Decide the fate of a request: (local failure or None, response faults)."""
        with self._lock:
            if self.match_path is not None and self.match_path not in path:
                return None, Plan()
            if self.fail_first > 0:
                self.fail_first -= 1
                return (self.fail_status, self.retry_after), Plan()
            return None, Plan(
                cut_after=self.cut_after_bytes,
                flip_at=self.flip_byte_at,
                stall_seconds=self.stall_seconds,
                stall_after=self.stall_after_bytes,
                throttle=self.throttle_bytes_per_s,
                strip_range=self.strip_range,
            )

    def _take(self, kind: Literal["cut", "flip", "stall"]) -> bool:
        """Consume one use of a fault's budget; False when it is used up."""
        attr = f"{kind}_times"
        with self._lock:
            left: int | None = getattr(self, attr)
            if left is None:
                return True
            if left <= 0:
                return False
            setattr(self, attr, left - 1)
            return True


class TcpRelay:
    """Relays TCP connections to `upstream` byte for byte (TLS included) and counts them."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.connections = 0
        self._listener = socket.create_server((LOOPBACK, 0))
        self._listener.settimeout(0.1)
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self._listener.getsockname()[1]}"

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            client.settimeout(None)
            upstream = socket.create_connection(self.upstream)
            self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                t = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                self._threads.append(t)
                t.start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closing.set()
        self._accepter.join(timeout=5)
        self._listener.close()
        for s in self._sockets:
            s.close()
        for t in self._threads:
            t.join(timeout=5)
