"""The connection pools behind `HttpCore`'s client, one per URL scheme.

httpx builds its TLS context, CA certificates loaded (~20 ms), when a transport is made,
whether or not it ever speaks TLS; a pull from a plain-HTTP registry (common on an
air-gapped network) never does. So `http://` requests go through a pool whose context is
never used, and `https://` requests through a pool built on the first `https://`
request with the trust as given: True for httpx's default (which honours SSL_CERT_FILE
and SSL_CERT_DIR), or the context of our CA bundle.

The plain pool's context is strict and holds no CA certificate: were it ever asked to
speak TLS, every handshake would fail. Proxies taken from the environment are mounted by
the client itself and keep their own transports.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

import httpx

#: trust (`verify`) -> a connection pool using it
PoolFactory = Callable[[ssl.SSLContext | bool], httpx.AsyncBaseTransport]


class SchemeTransport(httpx.AsyncBaseTransport):
    """`http://` through a pool without TLS trust; `https://` through one made on first use."""

    def __init__(self, verify: ssl.SSLContext | bool, pool: PoolFactory) -> None:
        self._verify = verify
        self._make_pool = pool
        # PROTOCOL_TLS_CLIENT: certificates required and host names checked; none trusted.
        self._plain = pool(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
        self._tls: httpx.AsyncBaseTransport | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme == "http":
            return await self._plain.handle_async_request(request)
        if self._tls is None:
            self._tls = self._make_pool(self._verify)
        return await self._tls.handle_async_request(request)

    async def aclose(self) -> None:
        try:
            await self._plain.aclose()
        finally:
            if self._tls is not None:
                await self._tls.aclose()


__all__ = ["PoolFactory", "SchemeTransport"]
