"""Real loopback servers for end-to-end tests (no pytest dependency), one kind a module:

- ``registry``: ``RegistryServer``, CNCF distribution (``docker-registry``) with
  optional htpasswd / token auth, TLS, pull-through-cache mode; ``RedirectingRegistry``
  sends blob GETs to a CDN.
- ``token``: ``TokenServer``, the Docker token-auth endpoint (ES256 JWT), in-process.
- ``tls``: ``TlsFiles``, a test CA and a server certificate.
- ``static``: ``StaticServer``, a directory with Range support, or a 302 redirector.
- ``proxies``: ``FaultProxy``, a TCP proxy injecting cuts, stalls, throttling, bit flips
  and local 500/429 answers, with a request log (``proxy_connection`` relays one
  connection); ``TcpRelay``, a byte-for-byte relay counting connections.
- ``hostile``: ``HostileCdn`` and ``RawServer``, servers that misbehave on purpose.
- ``common`` and ``threaded``: what the others share.

Everything binds and connects to 127.0.0.1 only. See /work/shared/TESTING.md.
"""

from servers.common import LOOPBACK, HasHost, RequestRecord, free_port, request_rounds
from servers.hostile import HostileCdn, RawHandler, RawServer, endless_chunked
from servers.proxies import FaultProxy, TcpRelay
from servers.registry import REGISTRY_BINARY, RedirectingRegistry, RegistryServer
from servers.static import StaticServer
from servers.tls import TlsFiles
from servers.token import TokenRequest, TokenServer, libtrust_key_id

__all__ = [
    "LOOPBACK",
    "REGISTRY_BINARY",
    "FaultProxy",
    "HasHost",
    "HostileCdn",
    "RawHandler",
    "RawServer",
    "RedirectingRegistry",
    "RegistryServer",
    "RequestRecord",
    "StaticServer",
    "TcpRelay",
    "TlsFiles",
    "TokenRequest",
    "TokenServer",
    "endless_chunked",
    "free_port",
    "libtrust_key_id",
    "request_rounds",
]
