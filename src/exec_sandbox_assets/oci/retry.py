"""When to retry a failed request, and what the failure is called when we stop.

`RetryPolicy` (backoff with full jitter, `Retry-After`) decides how often and how
patiently; `RETRYABLE_ERRORS` and `retryable_status` what is worth another attempt (a
TLS verification failure or TLS spoken to a plain-HTTP server never is: the next answer
would be the same). `status_error` and `transport_error` map what is left to the error
tree, with messages that name the method, the redacted URL, the peer and the reason:

    404            -> AssetNotFoundError
    401, 403       -> AuthError (with the caller's hint)
    anything else  -> AssetDownloadError
"""

from __future__ import annotations

import email.utils
import math
import random
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx

from exec_sandbox_assets.base.errors import (
    AssetDownloadError,
    AssetError,
    AssetNotFoundError,
    AuthError,
    ConfigError,
)
from exec_sandbox_assets.base.safetext import clean_text, redact_url
from exec_sandbox_assets.oci.bodies import MAX_ERROR_BODY, error_reason, read_capped


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


# Go's net/http (distribution, zot, Harbor's core) answering plain HTTP on a TLS port.
HTTPS_SERVER_REPLY = b"Client sent an HTTP request to an HTTPS server"
# The repository of a distribution API path: /v2/<name>/manifests|blobs|tags/...
_API_PATH_RE = re.compile(r"^/v2/(.+?)/(?:manifests|blobs|tags)/")


def _netloc(url: httpx.URL) -> str:
    """`host[:port]` as a reference writes it (an IPv6 address in brackets), cleaned."""
    host = f"[{url.host}]" if ":" in url.host else url.host
    return clean_text(f"{host}:{url.port}" if url.port else host, 300)


def reference_for(url: httpx.URL, scheme: str) -> str:
    """The reference to type for the registry `url` is on, with `scheme` written out
    (`http://127.0.0.1:5000/repo`), not the API URL: what the user gives us."""
    where = _netloc(url)
    match = _API_PATH_RE.match(url.path)
    repository = clean_text(match.group(1), 300) if match else "REPOSITORY"
    return f"{scheme}://{where}/{repository}"


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


async def status_error(
    method: str,
    url: str,
    response: httpx.Response,
    attempts: int,
    auth_hint: Callable[[httpx.Response], str] | None = None,
) -> AssetError:
    """The error for a final non-2xx answer (the response is closed here)."""
    body = b""
    try:
        body = await read_capped(response, url, MAX_ERROR_BODY)
    except (httpx.HTTPError, AssetError):  # an encoded or endless body: no reason
        pass
    finally:
        await response.aclose()
    reason = error_reason(body)
    status = response.status_code
    if status == 400 and HTTPS_SERVER_REPLY in body:
        reason = (
            f"it serves https, not http; name it {reference_for(response.url, 'https')} "
            "(with --ca-bundle FILE for a private CA)"
        )
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
        hint = auth_hint(response) if auth_hint is not None else ""
        return AuthError(f"{message} [{hint}]" if hint else message)
    return AssetDownloadError(message)


def transport_error(
    method: str, url: str, exc: Exception, attempts: int, peer: str
) -> AssetDownloadError:
    """The error for a request that got no answer (connection, TLS, timeout)."""
    tries = f" (after {attempts} attempts)" if attempts > 1 else ""
    target = httpx.URL(url)
    shown = redact_url(url)
    where = _netloc(target)
    if tls_verify_failed(exc):
        return AssetDownloadError(
            f"{method} {shown}: TLS certificate of {where} not trusted "
            f"(a private CA needs a CA bundle): {describe(exc)}"
        )
    if tls_to_plain_http(exc):
        return AssetDownloadError(
            f"{method} {shown}: {where} answered a TLS handshake in plain "
            f"HTTP: it serves http, not https; name it {reference_for(target, 'http')}: "
            f"{describe(exc)}"
        )
    if isinstance(exc, httpx.ConnectError):
        base = f"{target.scheme}://{where}"
        return AssetDownloadError(
            f"{method} {shown}: {peer} at {base} is unreachable: {describe(exc)}{tries}"
        )
    return AssetDownloadError(f"{method} {shown}: {describe(exc)}{tries}")


__all__ = [
    "DEFAULT_RETRY",
    "HTTPS_SERVER_REPLY",
    "RETRYABLE_ERRORS",
    "RetryPolicy",
    "describe",
    "reference_for",
    "retryable_status",
    "status_error",
    "tls_to_plain_http",
    "tls_verify_failed",
    "transport_error",
]
