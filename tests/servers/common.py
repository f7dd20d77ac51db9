"""What every test server shares: the loopback address, free ports, the request log."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from typing import Protocol

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


class HasHost(Protocol):
    """Anything exposing ``host`` as ``"127.0.0.1:PORT"`` (all servers here do)."""

    @property
    def host(self) -> str: ...


@dataclass
class RequestRecord:
    """One HTTP request seen by a StaticServer or FaultProxy.

    ``headers`` keys are lower-cased (``rec.headers.get("range")``); repeated
    headers are joined with ", ". ``status`` is filled in once the response
    head is seen (None if the connection died first).
    """

    method: str
    path: str
    headers: dict[str, str]
    status: int | None = None
    answered_by_proxy: bool = False
    connection_id: int = 0
    # time.monotonic() when the request head arrived, and when the first byte of its
    # answer left for the client (FaultProxy): what a round-trip count is read from.
    arrived: float = field(default_factory=time.monotonic)
    answered: float | None = None


def request_rounds(records: list[RequestRecord]) -> list[tuple[int, RequestRecord]]:
    """Each request with its round trip: 1 + the round of the latest request answered
    before it arrived (FaultProxy records, every answer held back by `stall_seconds`:
    requests sent together share a round, one sent because of an answer comes later)."""
    out: list[tuple[int, RequestRecord]] = []
    for record in sorted(records, key=lambda r: r.arrived):
        before = [n for n, q in out if q.answered is not None and q.answered <= record.arrived]
        out.append((1 + max(before, default=0), record))
    return out


def loopback_upstream(upstream: str | HasHost) -> tuple[str, int]:
    """(address, port) of a loopback server; anything else is refused."""
    host = upstream if isinstance(upstream, str) else upstream.host
    host = host.removeprefix("http://")
    name, _, port = host.rpartition(":")
    if name not in (LOOPBACK, "localhost"):
        raise ValueError(f"only loopback upstreams are allowed, got {host!r}")
    return LOOPBACK, int(port)
