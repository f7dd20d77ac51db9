"""One client connection through a FaultProxy: parse request heads, forward them
upstream, and relay the answer with the faults planned for it."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from servers.common import RequestRecord

if TYPE_CHECKING:
    from servers.proxies import FaultProxy


_REASONS = {
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}
_ERROR_CODES = {429: "TOOMANYREQUESTS", 503: "UNAVAILABLE"}


class _ClientReader:
    """Buffered reads from the client socket; EOF/errors surface as _Eof."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> None:
        try:
            data = self.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            raise _Eof
        self.buf += data

    def read_head(self, limit: int = 1 << 16) -> bytes:
        while True:
            # Tolerate stray CRLFs between requests (RFC 9112 section 2.2).
            while self.buf[:2] == b"\r\n":
                del self.buf[:2]
            idx = self.buf.find(b"\r\n\r\n")
            if idx >= 0:
                head = bytes(self.buf[: idx + 4])
                del self.buf[: idx + 4]
                return head
            if len(self.buf) > limit:
                raise _Eof
            self._fill()

    def read_line(self) -> bytes:
        while (idx := self.buf.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self.buf[: idx + 2])
        del self.buf[: idx + 2]
        return line

    def read_some(self, n: int) -> bytes:
        if not self.buf:
            self._fill()
        chunk = bytes(self.buf[:n])
        del self.buf[:n]
        return chunk


class _Eof(Exception):
    pass


def _without_range(head: bytes) -> bytes:
    lines = head.split(b"\r\n")
    return b"\r\n".join(x for x in lines if not x.lower().startswith(b"range:"))


def _parse_request_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    method, path = (parts[0], parts[1]) if len(parts) >= 2 else (parts[0], "")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        key, value = name.strip().lower(), value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return method, path, headers


@dataclass
class Plan:
    """Faults snapshotted for one forwarded request's response."""

    cut_after: int | None = None
    flip_at: int | None = None
    stall_seconds: float = 0.0
    stall_after: int | None = None
    throttle: int | None = None
    strip_range: bool = False


@dataclass
class _Response:
    record: RequestRecord
    plan: Plan
    pos: int = 0  # bytes of this response relayed (or consumed) so far
    head_buf: bytearray = field(default_factory=bytearray)
    body_start: int | None = None  # offset of the body in the response stream
    stalled: bool = False
    throttle_t0: float = 0.0
    throttle_sent: int = 0


class Connection:
    def __init__(self, proxy: FaultProxy, client: socket.socket, conn_id: int) -> None:
        self.proxy = proxy
        self.client = client
        self.id = conn_id
        self.upstream: socket.socket | None = None
        self.upstream_thread: threading.Thread | None = None
        self.response: _Response | None = None
        self.write_lock = threading.Lock()
        self.closed = threading.Event()

    # -- shared -------------------------------------------------------------

    def close(self) -> None:
        self.closed.set()
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def _to_client(self, data: bytes | bytearray) -> None:
        if not data:
            return
        # Counted before sending: a client that has read every byte must find them all
        # counted (counting after sendall raced with it); a failed send is taken back.
        self.proxy._count_to_client(len(data))
        with self.write_lock:
            try:
                self.client.sendall(data)
            except OSError:
                self.proxy._count_to_client(-len(data))
                raise

    # -- client -> upstream -------------------------------------------------

    def serve(self) -> None:
        reader = _ClientReader(self.client)
        try:
            while not self.closed.is_set():
                head = reader.read_head()
                method, path, headers = _parse_request_head(head)
                record = RequestRecord(method, path, headers, connection_id=self.id)
                self.proxy._log(record)
                fail, plan = self.proxy._plan(path)
                if fail is not None:
                    self._drain_body(reader, headers, None)
                    self._answer_locally(record, *fail)
                    if headers.get("connection", "").lower() == "close":
                        return
                    continue
                if self.upstream is None and not self._connect_upstream(record):
                    return
                assert self.upstream is not None
                # Installed before forwarding so every byte of the answer is
                # attributed to this request (clients do not pipeline).
                self.response = _Response(record, plan)
                if plan.strip_range:
                    head = _without_range(head)
                self.upstream.sendall(head)
                self._drain_body(reader, headers, self.upstream)
        except (_Eof, OSError):
            pass
        finally:
            self.close()
            if self.upstream_thread is not None:
                self.upstream_thread.join(timeout=5)

    def _drain_body(
        self, reader: _ClientReader, headers: dict[str, str], sink: socket.socket | None
    ) -> None:
        def forward(data: bytes) -> None:
            if sink is not None:
                sink.sendall(data)

        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                line = reader.read_line()
                forward(line)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while (trailer := reader.read_line()) != b"\r\n":
                        forward(trailer)
                    forward(b"\r\n")
                    return
                remaining = size + 2  # chunk data + CRLF
                while remaining:
                    data = reader.read_some(remaining)
                    forward(data)
                    remaining -= len(data)
        remaining = int(headers.get("content-length", "0") or "0")
        while remaining > 0:
            data = reader.read_some(min(remaining, 1 << 16))
            forward(data)
            remaining -= len(data)

    def _answer_locally(self, record: RequestRecord, status: int, retry_after: str | None) -> None:
        code = _ERROR_CODES.get(status, "UNKNOWN")
        body = json.dumps(
            {"errors": [{"code": code, "message": f"injected by FaultProxy ({status})"}]}
        ).encode()
        lines = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
        ]
        if retry_after is not None:
            lines.append(f"Retry-After: {retry_after}")
        payload = ("\r\n".join(lines) + "\r\n\r\n").encode()
        if record.method != "HEAD":
            payload += body
        record.status = status
        record.answered_by_proxy = True
        self._to_client(payload)

    def _connect_upstream(self, record: RequestRecord) -> bool:
        try:
            self.upstream = socket.create_connection(self.proxy.upstream_addr, timeout=10)
            self.upstream.settimeout(None)
        except OSError:
            # What a reverse proxy in front of a dead registry answers.
            self._answer_locally(record, 502, None)
            return False
        self.upstream_thread = threading.Thread(
            target=self._pump_upstream, name=f"FaultProxy-up-{self.id}", daemon=True
        )
        self.upstream_thread.start()
        return True

    # -- upstream -> client -------------------------------------------------

    def _pump_upstream(self) -> None:
        assert self.upstream is not None
        try:
            while not self.closed.is_set():
                data = self.upstream.recv(65536)
                if not data:
                    break
                resp = self.response
                if resp is None:
                    self._to_client(data)
                elif not self._relay(resp, data):
                    break  # cut
        except OSError:
            pass
        finally:
            self.close()

    def _relay(self, resp: _Response, data: bytes) -> bool:
        """Relay one upstream chunk applying the response's faults; False = cut."""
        proxy = self.proxy
        out = bytearray(data)
        p0 = resp.pos
        resp.pos += len(data)
        if resp.body_start is None:
            resp.head_buf += data
            idx = resp.head_buf.find(b"\r\n\r\n")
            if idx >= 0:
                resp.body_start = idx + 4
                status_line = bytes(resp.head_buf[: resp.head_buf.find(b"\r\n")])
                with contextlib.suppress(IndexError, ValueError):
                    resp.record.status = int(status_line.split(b" ")[1])
                resp.head_buf = bytearray()
        plan = resp.plan
        bs = resp.body_start
        # Offsets below are body offsets: index in `out` = body_start + offset - p0.
        if bs is not None and plan.flip_at is not None:
            i = bs + plan.flip_at - p0
            if 0 <= i < len(out) and proxy._take("flip"):
                out[i] ^= 0xFF
        cut = False
        if bs is not None and plan.cut_after is not None:
            i = bs + plan.cut_after - p0
            # Cut only when a byte beyond the limit exists: a body that fits is untouched.
            if 0 <= i < len(out) and proxy._take("cut"):
                del out[i:]
                cut = True
        stall_at: int | None = None
        if plan.stall_seconds > 0 and not resp.stalled:
            if plan.stall_after is None:
                stall_at = 0 if p0 == 0 else None
            elif bs is not None:
                i = bs + plan.stall_after - p0
                stall_at = i if 0 <= i < len(data) else None
            if stall_at is not None and not proxy._take("stall"):
                stall_at = None
        if stall_at is not None:
            resp.stalled = True
            self._send_throttled(resp, out[:stall_at])
            proxy._closing.wait(plan.stall_seconds)
            self._send_throttled(resp, out[stall_at:])
        else:
            self._send_throttled(resp, out)
        if resp.record.answered is None:
            resp.record.answered = time.monotonic()
        return not cut

    def _send_throttled(self, resp: _Response, data: bytearray) -> None:
        rate = resp.plan.throttle
        if not rate:
            self._to_client(data)
            return
        if resp.throttle_sent == 0:
            resp.throttle_t0 = time.monotonic()
        step = max(1, min(65536, rate // 20))
        view = memoryview(data)
        for off in range(0, len(view), step):
            piece = view[off : off + step]
            self._to_client(piece.tobytes())
            resp.throttle_sent += len(piece)
            delay = resp.throttle_t0 + resp.throttle_sent / rate - time.monotonic()
            if delay > 0 and self.proxy._closing.wait(delay):
                return
