"""A directory served over HTTP with Range and HEAD (a GitHub Releases stand-in), or a
302 redirector to another such server (GitHub -> CDN)."""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path
from typing import Literal, cast

from servers.common import RequestRecord
from servers.threaded import QuietHandler, ThreadedServer, TrackingHTTPServer

_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")


class _StaticHandler(QuietHandler):
    def _owner(self) -> StaticServer:
        return cast(StaticServer, cast(TrackingHTTPServer, self.server).owner)

    def do_HEAD(self) -> None:
        self._serve()

    def do_GET(self) -> None:
        self._serve()

    def _serve(self) -> None:
        owner = self._owner()
        record = RequestRecord(self.command, self.path, self._headers_dict())
        owner.requests.append(record)
        if owner.redirect_to is not None:
            record.status = 302
            self._send_simple(302, headers=[("Location", owner.redirect_to.url + self.path)])
            return
        target = owner._resolve(self.path)
        if target is None:
            record.status = 404
            self._send_simple(404, b"not found\n", [("Content-Type", "text/plain")])
            return
        size = target.stat().st_size
        start, end, status = 0, size - 1, 200
        range_header = self.headers.get("Range")
        if range_header is not None:
            parsed = _parse_range(range_header, size)
            if parsed == "unsatisfiable":
                record.status = 416
                self._send_simple(416, headers=[("Content-Range", f"bytes */{size}")])
                return
            if parsed is not None:
                start, end = parsed
                status = 206
        record.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(max(end - start + 1, 0)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if self.command == "HEAD":
            return
        with target.open("rb") as f:
            f.seek(start)
            remaining = end - start + 1
            while remaining > 0:
                chunk = f.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    return  # the client stopped reading (a range it no longer needs)
                remaining -= len(chunk)


def _parse_range(value: str, size: int) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """(start, end) inclusive; None = ignore the header (serve 200)."""
    m = _RANGE_RE.fullmatch(value.strip())
    if m is None or (m[1] == "" and m[2] == ""):
        return None
    if m[1] == "":  # suffix range: last N bytes
        n = int(m[2])
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(size - n, 0), size - 1
    start = int(m[1])
    end = int(m[2]) if m[2] else size - 1
    if start >= size or end < start:
        return "unsatisfiable"
    return start, min(end, size - 1)


class StaticServer(ThreadedServer):
    """Serves files under ``root`` over HTTP/1.1 with Range and HEAD support.

    With ``redirect_to`` it serves nothing itself and answers every GET/HEAD
    with 302 to the same path on the other server (GitHub -> CDN). ``requests``
    logs every request (method, path, lower-cased headers, status).
    """

    _handler = _StaticHandler

    def __init__(
        self, root: Path | None = None, *, redirect_to: StaticServer | None = None
    ) -> None:
        super().__init__()
        if (root is None) == (redirect_to is None):
            raise ValueError("give exactly one of root or redirect_to")
        self._root = root.resolve() if root is not None else None
        self.redirect_to = redirect_to
        self.requests: list[RequestRecord] = []

    @property
    def root(self) -> Path:
        if self._root is None:
            raise RuntimeError("a redirecting StaticServer has no root")
        return self._root

    def url_for(self, path: str) -> str:
        return f"{self.url}/{path.lstrip('/')}"

    def _resolve(self, raw_path: str) -> Path | None:
        rel = urllib.parse.unquote(urllib.parse.urlsplit(raw_path).path).lstrip("/")
        target = (self.root / rel).resolve()
        if not target.is_relative_to(self.root) or not target.is_file():
            return None
        return target
