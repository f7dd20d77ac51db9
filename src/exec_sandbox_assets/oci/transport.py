"""httpx's transport, reading sockets in large pieces.

httpcore reads a response 64 KiB per socket read. A blob of hundreds of MB is then
thousands of event-loop turns, each taking the GIL back from the threads that hash and
decompress (a turn can wait a whole switch interval for it). Asking for up to
`READ_SIZE` per read returns whatever the socket holds, so a fast link needs a tenth of
the turns and a slow one is unchanged. Measured on the benchmark release (2 CPUs, loopback
registry): the event loop's CPU drops by about 0.1 s per 160 MB.

httpx offers no parameter for it; the transport's connection pool takes a network
backend, which is wrapped after construction. Should a future httpx or httpcore move
those attributes, the transport is left as it is: slower, never wrong
(tests/test_registry_client.py checks the large reads still happen).
"""

# ruff: noqa: ASYNC109 (the `timeout` parameters are httpcore's interface)

from __future__ import annotations

import ssl
import typing
from typing import Any

import httpcore
import httpx

READ_SIZE = 1 << 20


class _LargeReadStream(httpcore.AsyncNetworkStream):
    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max(max_bytes, READ_SIZE), timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return _LargeReadStream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _LargeReadBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _LargeReadStream(stream)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_unix_socket(path, timeout, socket_options)
        return _LargeReadStream(stream)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def large_read_transport(**kwargs: Any) -> httpx.AsyncHTTPTransport:
    """`httpx.AsyncHTTPTransport(**kwargs)` whose connections read up to READ_SIZE at once."""
    transport = httpx.AsyncHTTPTransport(**kwargs)
    pool = getattr(transport, "_pool", None)
    backend = getattr(pool, "_network_backend", None)
    if isinstance(backend, httpcore.AsyncNetworkBackend):
        pool._network_backend = _LargeReadBackend(backend)  # type: ignore[union-attr]
    return transport


__all__ = ["READ_SIZE", "large_read_transport"]
