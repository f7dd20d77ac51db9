"""The retrying async HTTP core shared by the registry client and the GitHub Releases source.

`HttpCore` owns one `httpx.AsyncClient` (created on first use, HTTP/1.1, redirects
followed, a custom CA bundle when given, TLS trust loaded on the first https:// request:
`oci.schemes`) and one retry loop (`exchange`): connect/read errors, timeouts, 429 and
5xx are retried with exponential backoff and full jitter, honouring `Retry-After`; other
statuses map to the error tree at once (`oci.retry`):

    404            -> AssetNotFoundError
    401, 403       -> AuthError (after the auth flow's own round, when there is one)
    anything else  -> AssetDownloadError

Every message names the method, the URL (and where a redirect ended, without its
query string: CDN URLs carry signatures), the status and the server's own reason (a
registry's JSON `errors` body) when it sent one. URLs are shown through
`safetext.redact_url` (no userinfo, no credential query values) and whatever text the
server chose through `safetext.clean_text` (no terminal control sequences).

Hostile servers, and what every request is held to (whoever built it: us, a redirect,
the auth flow's token request):

- bodies are never content-decoded and every body is capped (`oci.bodies`: why, and
  how);
- a `TransferPolicy` bounds time (a deadline for metadata reads and response heads,
  a minimum rate for blob bodies: `oci.stream`) and refuses blocked hosts before any
  DNS lookup;
- no httpx exception escapes: each becomes an error of this package.

What is specific to one kind of server stays with its caller: the `auth` flow (registry
tokens), the hint added to a 401/403 (`auth_hint`), and how the server is named in a
message (`peer`: "registry", "release server").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

import httpx

from exec_sandbox_assets.base.errors import (
    AssetDownloadError,
    AuthError,
    BlockedHostError,
    ConfigError,
)
from exec_sandbox_assets.base.safetext import clean_text, redact_url
from exec_sandbox_assets.oci.auth import TokenEndpointError
from exec_sandbox_assets.oci.bodies import IDENTITY, guard_response, read_capped
from exec_sandbox_assets.oci.policy import DEFAULT_POLICY, TransferPolicy
from exec_sandbox_assets.oci.retry import (
    DEFAULT_RETRY,
    RETRYABLE_ERRORS,
    RetryPolicy,
    describe,
    retryable_status,
    status_error,
    tls_to_plain_http,
    tls_verify_failed,
    transport_error,
)
from exec_sandbox_assets.oci.schemes import SchemeTransport
from exec_sandbox_assets.oci.stream import BlobStream, open_blob_stream
from exec_sandbox_assets.oci.transport import large_read_transport

log = logging.getLogger(__name__)


class HttpCore:
    """One connection pool + the retry loop + error mapping. See the module docstring.

    `ca_bundle`, `timeout` and the connection limits apply to the client created here;
    a caller-provided `client` keeps its own settings and is not closed by `aclose`, but
    gets this core's guards added to its event hooks (encoding, caps, blocked hosts).
    `policy` (deadlines, minimum rate, blocked hosts) applies to every request.
    """

    def __init__(
        self,
        *,
        peer: str,
        auth: httpx.Auth | None = None,
        auth_hint: Callable[[httpx.Response], str] | None = None,
        ca_bundle: Path | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy = DEFAULT_RETRY,
        client: httpx.AsyncClient | None = None,
        user_agent: str = "exec-sandbox-assets",
        policy: TransferPolicy = DEFAULT_POLICY,
    ) -> None:
        self.peer = peer
        self.retry = retry
        self.policy = policy
        self._auth = auth
        self._auth_hint = auth_hint
        self._ca_bundle = ca_bundle
        self._timeout = timeout
        self._client = client
        self._owns_client = client is None
        self._headers = {"User-Agent": user_agent}
        if client is not None:
            client.event_hooks["request"].append(self._check_host)
            if guard_response not in client.event_hooks["response"]:
                client.event_hooks["response"].append(guard_response)

    async def aclose(self) -> None:
        if self._owns_client and self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            verify: ssl.SSLContext | bool = True
            if self._ca_bundle is not None:
                try:
                    verify = ssl.create_default_context(cafile=str(self._ca_bundle))
                except (OSError, ssl.SSLError) as exc:
                    raise ConfigError(f"cannot load CA bundle {self._ca_bundle}: {exc}") from None
            # Up to 4 blobs at once, each over up to 8 ranged streams (cache/download.py),
            # plus manifest/HEAD traffic.
            limits = httpx.Limits(max_connections=40, max_keepalive_connections=16)
            self._client = httpx.AsyncClient(
                # Hooks see every request httpx sends: redirects and auth rounds too.
                event_hooks={"request": [self._check_host], "response": [guard_response]},
                follow_redirects=True,
                http1=True,
                http2=False,
                verify=verify,  # for proxies from the environment; ours below
                timeout=httpx.Timeout(min(self._timeout, self.policy.deadline or math.inf)),
                limits=limits,
                # Direct connections; proxies from the environment get httpx's own. TLS
                # trust is loaded on the first https:// request, not for plain HTTP.
                transport=SchemeTransport(
                    verify,
                    lambda trust: large_read_transport(
                        verify=trust, http1=True, http2=False, limits=limits
                    ),
                ),
            )
        return self._client

    # -- requests ----------------------------------------------------------------------

    async def read(
        self, method: str, url: str, headers: Mapping[str, str], cap: int
    ) -> tuple[httpx.Response, bytes]:
        """A whole (small) body, capped; body failures are retried like head failures.

        The whole read, retries included, must end within the policy's deadline. Bodies
        are never content-decoded (the module docstring says why).
        """
        try:
            async with asyncio.timeout(self.policy.deadline):
                return await self._read(method, url, headers, cap)
        except TimeoutError:
            raise self._deadline_error(method, url, "complete answer") from None

    async def _read(
        self, method: str, url: str, headers: Mapping[str, str], cap: int
    ) -> tuple[httpx.Response, bytes]:
        for attempt in range(1, self.retry.attempts + 1):
            response = await self._exchange(method, url, headers)
            try:
                return response, await read_capped(response, url, cap)
            except RETRYABLE_ERRORS as exc:
                if attempt == self.retry.attempts:
                    raise transport_error(method, url, exc, attempt, self.peer) from exc
                delay = self.retry.backoff(attempt)
                self._log_retry(method, url, attempt, delay, describe(exc))
            except httpx.HTTPError as exc:  # nothing of httpx escapes
                raise AssetDownloadError(f"{method} {redact_url(url)}: {describe(exc)}") from exc
            finally:
                await response.aclose()
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    @contextlib.asynccontextmanager
    async def open_stream(
        self, url: str, offset: int = 0, headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[BlobStream]:
        """GET `url` from byte `offset` (Range); the caller hashes, caps and resumes."""
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        sent = {**IDENTITY, **(headers or {})}
        if offset > 0:
            sent["Range"] = f"bytes={offset}-"
        response = await self.exchange("GET", url, sent)
        try:
            yield open_blob_stream(response, url, offset, self.policy)
        finally:
            await response.aclose()

    async def exchange(self, method: str, url: str, headers: Mapping[str, str]) -> httpx.Response:
        """Send with retries; return the streaming 2xx response or raise the mapped error.

        Retries included, the response head must come within the policy's deadline."""
        try:
            async with asyncio.timeout(self.policy.deadline):
                return await self._exchange(method, url, headers)
        except TimeoutError:
            raise self._deadline_error(method, url, "answer") from None

    async def _exchange(self, method: str, url: str, headers: Mapping[str, str]) -> httpx.Response:
        client = self.client()
        policy = self.retry
        shown = redact_url(url)
        try:
            target = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise AssetDownloadError(f"{method} {shown}: invalid URL: {describe(exc)}") from None
        auth: httpx.Auth | httpx._client.UseClientDefault = httpx.USE_CLIENT_DEFAULT
        if self._auth is not None:
            auth = self._auth
        elif target.userinfo:
            # `https://user:token@host/...` (a private release server): sent as Basic auth,
            # as httpx would, but from a URL without them, which is what httpx logs.
            auth = httpx.BasicAuth(target.username, target.password)
        target = target.copy_with(userinfo=b"")
        for attempt in range(1, policy.attempts + 1):
            last = attempt == policy.attempts
            request = client.build_request(
                method, target, headers={**self._headers, **headers, **IDENTITY}
            )
            try:
                response = await client.send(request, auth=auth, stream=True, follow_redirects=True)
            except BlockedHostError as exc:  # never retried: the next answer would be the same
                raise BlockedHostError(f"{method} {shown}: {exc}") from None
            except TokenEndpointError as exc:
                if last or not retryable_status(exc.status):
                    raise AuthError(f"{method} {shown}: {exc}") from exc
                delay = policy.backoff(attempt)
                reason = str(exc)
            except AuthError as exc:  # a bad challenge or token answer
                raise AuthError(f"{method} {shown}: {exc}") from exc
            except RETRYABLE_ERRORS as exc:
                if last or tls_verify_failed(exc) or tls_to_plain_http(exc):
                    raise transport_error(method, url, exc, attempt, self.peer) from exc
                delay = policy.backoff(attempt)
                reason = describe(exc)
            except httpx.HTTPError as exc:  # redirect loops, unsupported schemes, ...
                raise AssetDownloadError(f"{method} {shown}: {describe(exc)}") from exc
            else:
                status = response.status_code
                if 200 <= status < 300:
                    return response
                if last or not retryable_status(status):
                    raise await status_error(method, url, response, attempt, self._auth_hint)
                asked = policy.retry_after(response.headers.get("retry-after"))
                delay = asked if asked is not None else policy.backoff(attempt)
                reason = f"{status} {clean_text(response.reason_phrase, 100)}"
                await response.aclose()
            self._log_retry(method, url, attempt, delay, reason)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    # -- hooks and messages -------------------------------------------------------------

    async def _check_host(self, request: httpx.Request) -> None:
        """Request hook: refuse a blocked host before httpx looks its name up."""
        if self.policy.is_blocked(request.url.host):
            raise BlockedHostError(
                f"refused to connect to {clean_text(request.url.host, 255)} "
                f"({redact_url(request.url.copy_with(query=None))}): {self.policy.blocked_reason}"
            )

    def _deadline_error(self, method: str, url: str, what: str) -> AssetDownloadError:
        return AssetDownloadError(
            f"{method} {redact_url(url)}: {self.peer} gave no {what} within the source "
            f"timeout of {self.policy.deadline:g} s"
        )

    def _log_retry(self, method: str, url: str, attempt: int, delay: float, reason: str) -> None:
        log.info(
            "%s request failed (%s); retrying in %.2fs",
            self.peer,
            reason,
            delay,
            extra={"method": method, "url": redact_url(url), "attempt": attempt},
        )


__all__ = ["HttpCore"]
