"""The retrying async HTTP core shared by the registry client and the GitHub Releases source.

`HttpCore` owns one `httpx.AsyncClient` (created on first use, HTTP/1.1, redirects
followed, a custom CA bundle when given) and one retry loop (`exchange`): connect/read
errors, timeouts, 429 and 5xx are retried with exponential backoff and full jitter,
honouring `Retry-After`; other statuses map to the error tree at once:

    404            -> AssetNotFoundError
    401, 403       -> AuthError (after the auth flow's own round, when there is one)
    anything else  -> AssetDownloadError

Every message names the method, the full URL (and where a redirect ended, without its
query string: CDN URLs carry signatures), the status and the server's own reason (a
registry's JSON `errors` body) when it sent one.

What is specific to one kind of server stays with its caller: the `auth` flow (registry
tokens), the hint added to a 401/403 (`auth_hint`), and how the server is named in a
message (`peer`: "registry", "release server").
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import math
import random
import re
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx

from exec_sandbox_assets.errors import (
    AssetDownloadError,
    AssetError,
    AssetNotFoundError,
    AuthError,
    ConfigError,
    SizeLimitError,
)
from exec_sandbox_assets.fsutil import CHUNK
from exec_sandbox_assets.oci.auth import BODY_CAP, TokenEndpointError

log = logging.getLogger(__name__)

CHUNK_SIZE = CHUNK
# Error bodies are read only this far, for the reason they give.
MAX_ERROR_BODY = 64 * 1024
# ASCII digits, bounded: int() refuses strings over 4300 digits with a ValueError.
_CONTENT_RANGE_RE = re.compile(r"^bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)$")
# Blobs are compressed already; a proxy re-encoding them would break the digest.
IDENTITY = {"Accept-Encoding": "identity"}


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry transient failures (attempts include the first)."""

    attempts: int = 4
    base_delay: float = 0.25
    max_delay: float = 8.0
    max_retry_after: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigError(f"retry attempts must be at least 1, got {self.attempts}")
        if min(self.base_delay, self.max_delay, self.max_retry_after) < 0:
            raise ConfigError("retry delays must not be negative")

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max_delay, base_delay * 2**(attempt-1))]."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return random.uniform(0.0, ceiling)  # noqa: S311  (jitter, not cryptography)

    def retry_after(self, value: str | None) -> float | None:
        """Seconds asked for by a `Retry-After` header (seconds or HTTP-date), capped."""
        if not value:
            return None
        try:
            seconds = float(value)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError, IndexError):
                return None
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            seconds = (when - datetime.now(UTC)).total_seconds()
        if not math.isfinite(seconds):
            return None
        return min(max(seconds, 0.0), self.max_retry_after)


DEFAULT_RETRY = RetryPolicy()


class BlobStream:
    """An open blob response. `offset` is where the data actually starts: the asked
    offset on 206, 0 when the server ignored `Range` and sent the whole blob (200).
    `total` is the size of the whole blob when the server said so."""

    def __init__(self, response: httpx.Response, url: str, offset: int, total: int | None):
        self._response = response
        self.url = url
        self.offset = offset
        self.total = total

    async def chunks(self) -> AsyncIterator[bytes]:
        """Raw bytes as sent (no content decoding), in pieces of at most CHUNK_SIZE.

        A broken body is AssetDownloadError, raised only after every byte received before
        the break was yielded, so a resume starts where the connection died. (httpx's own
        `aiter_raw(CHUNK_SIZE)` drops its partly filled buffer on an error: a cut under
        1 MiB would then make no progress at all, however often it is resumed.)
        """
        received = 0
        # Pieces joined once per chunk: one copy (a bytearray buffer costs three).
        pending: list[bytes] = []
        size = 0
        error: AssetDownloadError | None = None
        try:
            async for piece in self._response.aiter_raw():
                received += len(piece)
                if size + len(piece) > CHUNK_SIZE and pending:
                    yield b"".join(pending)
                    pending, size = [], 0
                while len(piece) > CHUNK_SIZE:  # never from httpx's 64 KiB reads; still
                    yield piece[:CHUNK_SIZE]
                    piece = piece[CHUNK_SIZE:]
                pending.append(piece)
                size += len(piece)
        except httpx.HTTPError as exc:
            error = AssetDownloadError(
                f"GET {self.url}: body broke off after {received} bytes "
                f"(from offset {self.offset}): {describe(exc)}"
            )
            error.__cause__ = exc
        if pending:
            yield b"".join(pending)
        if error is not None:
            raise error


class HttpCore:
    """One connection pool + the retry loop + error mapping. See the module docstring.

    `ca_bundle`, `timeout` and the connection limits apply to the client created here;
    a caller-provided `client` keeps its own settings and is not closed by `aclose`.
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
    ) -> None:
        self.peer = peer
        self.retry = retry
        self._auth = auth
        self._auth_hint = auth_hint
        self._ca_bundle = ca_bundle
        self._timeout = timeout
        self._client = client
        self._owns_client = client is None
        self._headers = {"User-Agent": user_agent}

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
            self._client = httpx.AsyncClient(
                event_hooks={"response": [cap_body]},
                follow_redirects=True,
                http1=True,
                http2=False,
                verify=verify,
                timeout=httpx.Timeout(self._timeout),
                # A handful of parallel blob streams plus manifest/HEAD traffic.
                limits=httpx.Limits(max_connections=16, max_keepalive_connections=8),
            )
        return self._client

    # -- requests ----------------------------------------------------------------------

    async def read(
        self, method: str, url: str, headers: Mapping[str, str], cap: int, *, raw: bool
    ) -> tuple[httpx.Response, bytes]:
        """A whole (small) body, capped; body failures are retried like head failures."""
        for attempt in range(1, self.retry.attempts + 1):
            response = await self.exchange(method, url, headers)
            try:
                return response, await read_capped(response, url, cap, raw=raw)
            except RETRYABLE_ERRORS as exc:
                if attempt == self.retry.attempts:
                    raise self._transport_error(method, url, exc, attempt) from exc
                delay = self.retry.backoff(attempt)
                self._log_retry(method, url, attempt, delay, describe(exc))
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
            yield self.blob_stream(response, url, offset)
        finally:
            await response.aclose()

    def blob_stream(self, response: httpx.Response, url: str, offset: int) -> BlobStream:
        status = response.status_code
        if status == 206:
            m = _CONTENT_RANGE_RE.match(response.headers.get("content-range", ""))
            if not m or int(m.group(1)) != offset:
                raise AssetDownloadError(
                    f"GET {url}: 206 with Content-Range "
                    f"{response.headers.get('content-range')!r}, asked for bytes={offset}-"
                )
            total = None if m.group(3) == "*" else int(m.group(3))
            return BlobStream(response, url, offset, total)
        if status == 200:
            if offset:
                log.debug("server ignored Range; restarting at 0", extra={"url": url})
            length = response.headers.get("content-length", "")
            return BlobStream(response, url, 0, int(length) if length.isdigit() else None)
        raise AssetDownloadError(f"GET {url}: unexpected status {status} for a blob")

    async def exchange(self, method: str, url: str, headers: Mapping[str, str]) -> httpx.Response:
        """Send with retries; return the streaming 2xx response or raise the mapped error."""
        client = self.client()
        policy = self.retry
        auth = self._auth if self._auth is not None else httpx.USE_CLIENT_DEFAULT
        for attempt in range(1, policy.attempts + 1):
            last = attempt == policy.attempts
            request = client.build_request(method, url, headers={**self._headers, **headers})
            try:
                response = await client.send(request, auth=auth, stream=True, follow_redirects=True)
            except TokenEndpointError as exc:
                if last or not retryable_status(exc.status):
                    raise AuthError(f"{method} {url}: {exc}") from exc
                delay = policy.backoff(attempt)
                reason = str(exc)
            except AuthError as exc:  # a bad challenge or token answer
                raise AuthError(f"{method} {url}: {exc}") from exc
            except RETRYABLE_ERRORS as exc:
                if last or tls_verify_failed(exc):
                    raise self._transport_error(method, url, exc, attempt) from exc
                delay = policy.backoff(attempt)
                reason = describe(exc)
            except httpx.HTTPError as exc:  # redirect loops, unsupported schemes, ...
                raise AssetDownloadError(f"{method} {url}: {describe(exc)}") from exc
            else:
                status = response.status_code
                if 200 <= status < 300:
                    return response
                if last or not retryable_status(status):
                    raise await self._status_error(method, url, response, attempt)
                asked = policy.retry_after(response.headers.get("retry-after"))
                delay = asked if asked is not None else policy.backoff(attempt)
                reason = f"{status} {response.reason_phrase}"
                await response.aclose()
            self._log_retry(method, url, attempt, delay, reason)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    # -- errors ------------------------------------------------------------------------

    def _log_retry(self, method: str, url: str, attempt: int, delay: float, reason: str) -> None:
        log.info(
            "%s request failed (%s); retrying in %.2fs",
            self.peer,
            reason,
            delay,
            extra={"method": method, "url": url, "attempt": attempt},
        )

    async def _status_error(
        self, method: str, url: str, response: httpx.Response, attempts: int
    ) -> AssetError:
        try:
            reason = error_reason(await read_capped(response, url, MAX_ERROR_BODY, raw=False))
        except (httpx.HTTPError, SizeLimitError):
            reason = ""
        finally:
            await response.aclose()
        status = response.status_code
        message = f"{method} {url}: {status} {response.reason_phrase}"
        final = response.url.copy_with(query=None)  # signed CDN query strings stay out
        if str(final) != url:
            message += f" (redirected to {final})"
        if reason:
            message += f": {reason}"
        if attempts > 1:
            message += f" (after {attempts} attempts)"
        if status == 404:
            return AssetNotFoundError(message)
        if status in (401, 403):
            hint = self._auth_hint(response) if self._auth_hint is not None else ""
            return AuthError(f"{message} [{hint}]" if hint else message)
        return AssetDownloadError(message)

    def _transport_error(
        self, method: str, url: str, exc: Exception, attempts: int
    ) -> AssetDownloadError:
        tries = f" (after {attempts} attempts)" if attempts > 1 else ""
        target = httpx.URL(url)
        if tls_verify_failed(exc):
            return AssetDownloadError(
                f"{method} {url}: TLS certificate of {target.netloc.decode()} not trusted "
                f"(a private CA needs a CA bundle): {describe(exc)}"
            )
        if isinstance(exc, httpx.ConnectError):
            base = f"{target.scheme}://{target.netloc.decode()}"
            return AssetDownloadError(
                f"{method} {url}: {self.peer} at {base} is unreachable: {describe(exc)}{tries}"
            )
        return AssetDownloadError(f"{method} {url}: {describe(exc)}{tries}")


class BodyTooLargeError(httpx.TransportError):
    """A body httpx reads whole by itself (redirect, 401, token answer) was too long."""


class _CappedStream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, cap: int, url: httpx.URL) -> None:
        self._inner, self._cap, self._url = inner, cap, url

    async def __aiter__(self) -> AsyncIterator[bytes]:
        size = 0
        async for chunk in self._inner:
            size += len(chunk)
            if size > self._cap:
                where = self._url.copy_with(query=None)
                raise BodyTooLargeError(f"body from {where} exceeds {self._cap} bytes")
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


async def cap_body(response: httpx.Response) -> None:
    """Response hook: cap every body that is not a 2xx (or is capped by its request).

    httpx reads redirect bodies and the bodies an auth flow answered (401, token
    endpoint) whole, with no limit: an endless one would fill memory. 2xx bodies are
    left alone (blob streams); their readers cap them (`read_capped`, the store).
    """
    cap = response.request.extensions.get(BODY_CAP)
    if cap is None and not 200 <= response.status_code < 300:
        cap = MAX_ERROR_BODY
    if isinstance(cap, int) and isinstance(response.stream, httpx.AsyncByteStream):
        response.stream = _CappedStream(response.stream, cap, response.url)


RETRYABLE_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


def retryable_status(status: int) -> bool:
    return status == 429 or status >= 500


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def tls_verify_failed(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLCertVerificationError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


async def read_capped(response: httpx.Response, url: str, cap: int, *, raw: bool) -> bytes:
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > cap:
        raise SizeLimitError(f"{url}: Content-Length {length} exceeds the limit of {cap} bytes")
    parts: list[bytes] = []
    size = 0
    chunks = response.aiter_raw(CHUNK_SIZE) if raw else response.aiter_bytes(CHUNK_SIZE)
    async for chunk in chunks:
        size += len(chunk)
        if size > cap:
            raise SizeLimitError(f"{url}: body exceeds the limit of {cap} bytes")
        parts.append(chunk)
    return b"".join(parts)


def error_reason(body: bytes) -> str:
    """`CODE: message` from distribution's `{"errors": [...]}` body, or ""."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # nesting recurses
        return ""
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if not isinstance(errors, list):
        return ""
    reasons = []
    for err in errors[:3]:
        if isinstance(err, dict):
            code, message = err.get("code"), err.get("message")
            parts = [str(p) for p in (code, message) if isinstance(p, str) and p]
            reasons.append(": ".join(parts))
    return "; ".join(r for r in reasons if r)[:300]


__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_RETRY",
    "IDENTITY",
    "BlobStream",
    "HttpCore",
    "RetryPolicy",
    "describe",
    "read_capped",
]
