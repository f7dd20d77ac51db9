"""The retrying async HTTP core shared by the registry client and the GitHub Releases source.

`HttpCore` owns one `httpx.AsyncClient` (created on first use, HTTP/1.1, redirects
followed, a custom CA bundle when given) and one retry loop (`exchange`): connect/read
errors, timeouts, 429 and 5xx are retried with exponential backoff and full jitter,
honouring `Retry-After`; other statuses map to the error tree at once:

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

- bodies are never content-decoded. Every request says `Accept-Encoding: identity`;
  a response that comes with another `Content-Encoding` anyway has that header taken
  off before httpx could decode it (a 16 KiB zstd body inflates to GBs in one decoder
  call, before any cap can count it) and is then refused where it would be used
  (`encoding_refused`): a transport error naming the source, so the next one is tried;
- every body httpx reads whole by itself (redirects, 401s, token answers) is capped,
  as raw bytes (`guard_response`);
- a `TransferPolicy` bounds time (a deadline for metadata reads and response heads,
  a minimum rate for blob bodies) and refuses blocked hosts before any DNS lookup;
- no httpx exception escapes: each becomes an error of this package.

What is specific to one kind of server stays with its caller: the `auth` flow (registry
tokens), the hint added to a 401/403 (`auth_hint`), and how the server is named in a
message (`peer`: "registry", "release server").
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
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

from exec_sandbox_assets import safejson
from exec_sandbox_assets.errors import (
    AssetDownloadError,
    AssetError,
    AssetNotFoundError,
    AuthError,
    BlockedHostError,
    ConfigError,
    FormatError,
    SizeLimitError,
)
from exec_sandbox_assets.oci.auth import BODY_CAP, REFUSED_ENCODING, TokenEndpointError
from exec_sandbox_assets.oci.policy import DEFAULT_POLICY, TransferPolicy
from exec_sandbox_assets.safetext import clean_text, redact_url

log = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024
# Error bodies are read only this far, for the reason they give.
MAX_ERROR_BODY = 64 * 1024
# ASCII digits, bounded: int() refuses strings over 4300 digits with a ValueError (and
# str.isdigit() accepts "²", which int() refuses too).
_LENGTH_RE = re.compile(r"^[0-9]{1,19}$")
_CONTENT_RANGE_RE = re.compile(r"^bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)$")
# Sent on every request: blobs are compressed already (a proxy re-encoding them would
# break the digest), and a decoded body is a decompression bomb waiting to happen.
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

    def __init__(
        self,
        response: httpx.Response,
        url: str,
        offset: int,
        total: int | None,
        policy: TransferPolicy = DEFAULT_POLICY,
    ):
        self._response = response
        self.url = url
        self.offset = offset
        self.total = total
        self._policy = policy

    async def chunks(self) -> AsyncIterator[bytes]:
        """Raw bytes as sent (no content decoding), in pieces of at most CHUNK_SIZE.

        A broken body is AssetDownloadError, raised only after every byte received before
        the break was yielded, so a resume starts where the connection died. (httpx's own
        `aiter_raw(CHUNK_SIZE)` drops its partly filled buffer on an error: a cut under
        1 MiB would then make no progress at all, however often it is resumed.) So is a
        body slower than the policy's minimum rate: each `rate_window` seconds spent
        waiting must bring `min_rate * rate_window` bytes (a trickle of a byte every few
        seconds never trips a read timeout).
        """
        received = 0
        pending = bytearray()
        error: AssetDownloadError | None = None
        window = self._policy.rate_window
        quota = self._policy.min_rate * window
        loop = asyncio.get_running_loop()
        # Seconds of waiting left in the current window, and the bytes it brought so far.
        # Only the waits are counted: the time our consumer spends between two pieces
        # (hashing, a slow disk) is not the server's.
        budget, since = window, 0
        pieces = self._response.aiter_raw()
        try:
            while True:
                try:
                    if quota:
                        started = loop.time()
                        async with asyncio.timeout(budget):
                            piece = await anext(pieces)
                        budget -= loop.time() - started
                    else:
                        piece = await anext(pieces)
                except StopAsyncIteration:
                    break
                received += len(piece)
                since += len(piece)
                if since >= quota:
                    budget, since = window, 0
                pending += piece
                if len(pending) >= CHUNK_SIZE:
                    yield bytes(pending[:CHUNK_SIZE])
                    del pending[:CHUNK_SIZE]
        except TimeoutError:
            error = AssetDownloadError(
                f"GET {redact_url(self.url)}: body slower than the minimum rate of "
                f"{self._policy.min_rate} bytes/s over {window:g} s; gave up after {received} "
                f"bytes (from offset {self.offset})"
            )
        except httpx.HTTPError as exc:
            error = AssetDownloadError(
                f"GET {redact_url(self.url)}: body broke off after {received} bytes "
                f"(from offset {self.offset}): {describe(exc)}"
            )
            error.__cause__ = exc
        if pending:
            yield bytes(pending)
        if error is not None:
            raise error


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
            self._client = httpx.AsyncClient(
                # Hooks see every request httpx sends: redirects and auth rounds too.
                event_hooks={"request": [self._check_host], "response": [guard_response]},
                follow_redirects=True,
                http1=True,
                http2=False,
                verify=verify,
                timeout=httpx.Timeout(min(self._timeout, self.policy.deadline or math.inf)),
                # A handful of parallel blob streams plus manifest/HEAD traffic.
                limits=httpx.Limits(max_connections=16, max_keepalive_connections=8),
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
                    raise self._transport_error(method, url, exc, attempt) from exc
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
            yield self.blob_stream(response, url, offset)
        finally:
            await response.aclose()

    def blob_stream(self, response: httpx.Response, url: str, offset: int) -> BlobStream:
        # Raw bytes of an encoded body would fail the digest: a trust error for what is
        # only a misbehaving server or proxy. Refused here, as a transport error.
        encoding_refused(response, url)
        status = response.status_code
        if status == 206:
            content_range = response.headers.get("content-range", "")
            parsed = parse_content_range(content_range)
            if parsed is None or parsed[0] != offset:
                raise AssetDownloadError(
                    f"GET {redact_url(url)}: 206 with Content-Range "
                    f"{clean_text(content_range, 100)!r}, asked for bytes={offset}-"
                )
            return BlobStream(response, url, offset, parsed[2], self.policy)
        if status == 200:
            if offset:
                log.debug("server ignored Range; restarting at 0", extra={"url": redact_url(url)})
            return BlobStream(response, url, 0, content_length(response), self.policy)
        raise AssetDownloadError(f"GET {redact_url(url)}: unexpected status {status} for a blob")

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
                    raise self._transport_error(method, url, exc, attempt) from exc
                delay = policy.backoff(attempt)
                reason = describe(exc)
            except httpx.HTTPError as exc:  # redirect loops, unsupported schemes, ...
                raise AssetDownloadError(f"{method} {shown}: {describe(exc)}") from exc
            else:
                status = response.status_code
                if 200 <= status < 300:
                    return response
                if last or not retryable_status(status):
                    raise await self._status_error(method, url, response, attempt)
                asked = policy.retry_after(response.headers.get("retry-after"))
                delay = asked if asked is not None else policy.backoff(attempt)
                reason = f"{status} {clean_text(response.reason_phrase, 100)}"
                await response.aclose()
            self._log_retry(method, url, attempt, delay, reason)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    # -- errors ------------------------------------------------------------------------

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

    async def _status_error(
        self, method: str, url: str, response: httpx.Response, attempts: int
    ) -> AssetError:
        try:
            reason = error_reason(await read_capped(response, url, MAX_ERROR_BODY))
        except (httpx.HTTPError, AssetError):  # an encoded or endless body: no reason
            reason = ""
        finally:
            await response.aclose()
        status = response.status_code
        message = f"{method} {redact_url(url)}: {status} {clean_text(response.reason_phrase, 100)}"
        final = response.url.copy_with(query=None)  # signed CDN query strings stay out
        if str(final) != url:
            message += f" (redirected to {redact_url(final)})"
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
        shown = redact_url(url)
        where = clean_text(f"{target.host}:{target.port}" if target.port else target.host, 300)
        if tls_verify_failed(exc):
            return AssetDownloadError(
                f"{method} {shown}: TLS certificate of {where} not trusted "
                f"(a private CA needs a CA bundle): {describe(exc)}"
            )
        if tls_to_plain_http(exc):
            plain = target.copy_with(scheme="http")
            return AssetDownloadError(
                f"{method} {shown}: {where} answered a TLS handshake in plain "
                f"HTTP: it serves http, not https; name it http://{where}/... "
                f"(here: {redact_url(str(plain))}): {describe(exc)}"
            )
        if isinstance(exc, httpx.ConnectError):
            base = f"{target.scheme}://{where}"
            return AssetDownloadError(
                f"{method} {shown}: {self.peer} at {base} is unreachable: {describe(exc)}{tries}"
            )
        return AssetDownloadError(f"{method} {shown}: {describe(exc)}{tries}")


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
                where = redact_url(self._url.copy_with(query=None))
                raise BodyTooLargeError(f"body from {where} exceeds {self._cap} bytes")
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


async def guard_response(response: httpx.Response) -> None:
    """Response hook: no content decoding, and a cap on every body httpx reads itself.

    A `Content-Encoding` other than identity is taken off the headers (so httpx never
    decodes) and kept in the `REFUSED_ENCODING` extension, for the body's reader to
    refuse (`encoding_refused`). httpx reads redirect bodies and the bodies an auth flow
    answered (401, token endpoint) whole, with no limit: an endless one would fill
    memory, so every non-2xx body (and one capped by its request) is capped as raw
    bytes. 2xx bodies are left alone (blob streams); their readers cap them
    (`read_capped`, the store).
    """
    encoding = response.headers.get("content-encoding", "").strip()
    if encoding and encoding.lower() != "identity":
        response.extensions[REFUSED_ENCODING] = encoding
        del response.headers["content-encoding"]
    cap = response.request.extensions.get(BODY_CAP)
    if cap is None and not 200 <= response.status_code < 300:
        cap = MAX_ERROR_BODY
    if isinstance(cap, int) and isinstance(response.stream, httpx.AsyncByteStream):
        response.stream = _CappedStream(response.stream, cap, response.url)


RETRYABLE_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


def retryable_status(status: int) -> bool:
    return status == 429 or status >= 500


def describe(exc: BaseException) -> str:
    """`Type: message`, display-safe (h11 quotes the bytes a server sent in its errors)."""
    text = clean_text(str(exc))
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


# What OpenSSL says when the server answers the ClientHello in plain HTTP.
_PLAIN_HTTP_REPLY = ("wrong_version_number", "wrong version number", "http_request")


def tls_to_plain_http(exc: BaseException) -> bool:
    """A TLS connection to a plain-HTTP server (a registry on http:// named without the
    scheme): never retried, it will not change."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError | httpx.ConnectError):
            text = f"{getattr(current, 'reason', '')} {current}".lower()
            if any(marker in text for marker in _PLAIN_HTTP_REPLY):
                return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def parse_content_range(value: str) -> tuple[int, int, int | None] | None:
    """`bytes FIRST-LAST/TOTAL` (TOTAL may be `*`) -> (first, last, total), or None when
    malformed or inconsistent (last before first, or past the total)."""
    m = _CONTENT_RANGE_RE.match(value)
    if m is None:
        return None
    first, last = int(m.group(1)), int(m.group(2))
    total = None if m.group(3) == "*" else int(m.group(3))
    if last < first or (total is not None and last >= total):
        return None
    return first, last, total


def content_length(response: httpx.Response) -> int | None:
    """The announced body size, when it is a plain decimal number."""
    m = _LENGTH_RE.match(response.headers.get("content-length", ""))
    return int(m.group()) if m else None


def encoding_refused(response: httpx.Response, url: str) -> None:
    """AssetDownloadError when the server content-encoded a body we asked not to be.

    Refused rather than decoded: nothing we fetch needs it (blobs are compressed, and
    their digests cover the bytes as sent), and a refusal cannot be a bomb."""
    encoding = response.extensions.get(REFUSED_ENCODING)
    if encoding is not None:
        raise AssetDownloadError(
            f"GET {redact_url(url)}: the server sent a body with Content-Encoding "
            f"{clean_text(str(encoding), 60)!r} though asked for identity; not decoding it"
        )


async def read_capped(response: httpx.Response, url: str, cap: int) -> bytes:
    """The raw body (never content-decoded: see `guard_response`), at most `cap` bytes."""
    encoding_refused(response, url)
    length = content_length(response)
    if length is not None and length > cap:
        raise SizeLimitError(
            f"{redact_url(url)}: Content-Length {length} exceeds the limit of {cap} bytes"
        )
    parts: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw(CHUNK_SIZE):
        size += len(chunk)
        if size > cap:
            raise SizeLimitError(f"{redact_url(url)}: body exceeds the limit of {cap} bytes")
        parts.append(chunk)
    return b"".join(parts)


def error_reason(body: bytes) -> str:
    """`CODE: message` from distribution's `{"errors": [...]}` body, or ""."""
    try:
        doc = safejson.loads(body, "error body", max_size=MAX_ERROR_BODY)
    except FormatError:
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
    return clean_text("; ".join(r for r in reasons if r), 300)  # the server's words


__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_RETRY",
    "IDENTITY",
    "BlobStream",
    "HttpCore",
    "RetryPolicy",
    "TransferPolicy",
    "describe",
    "encoding_refused",
    "guard_response",
    "parse_content_range",
    "read_capped",
]
