"""Async pull client for the OCI distribution API (no push: the publisher uses oras).

One `httpx.AsyncClient` per `RegistryClient`, created on first use. Every request goes
through one retry loop (`_exchange`): connect/read errors, timeouts, 429 and 5xx are
retried with exponential backoff and full jitter, honouring `Retry-After`; other
statuses map to the error tree at once:

    404            -> AssetNotFoundError
    401, 403       -> AuthError (after RegistryAuth's challenge round)
    anything else  -> AssetDownloadError

Every message names the method, the full URL, the status and the registry's own reason
(its JSON `errors` body) when it sent one.

Bytes are never trusted unverified: manifests fetched by digest and small blobs are
checked here; streamed blobs (`open_blob`) are hashed by the caller, which also resumes
a body that broke off by opening the blob again at a new offset.
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
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from exec_sandbox_assets.errors import (
    AssetDownloadError,
    AssetError,
    AssetNotFoundError,
    AuthError,
    ConfigError,
    FormatError,
    SizeLimitError,
)
from exec_sandbox_assets.oci.auth import Credentials, RegistryAuth, TokenEndpointError
from exec_sandbox_assets.oci.model import (
    ACCEPT_MANIFESTS,
    MAX_MANIFEST_SIZE,
    check_digest,
    compute_digest,
    is_digest,
    media_type_of,
    verify_bytes,
)
from exec_sandbox_assets.oci.reference import TAG_RE, RegistryRef

log = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024
# Error bodies are read only this far, for the reason they give.
_MAX_ERROR_BODY = 64 * 1024
_MAX_TAG_PAGES = 1000
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
# Blobs are compressed already; a proxy re-encoding them would break the digest.
_IDENTITY = {"Accept-Encoding": "identity"}


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
        """Raw bytes as sent (no content decoding); a broken body is AssetDownloadError."""
        received = 0
        try:
            async for chunk in self._response.aiter_raw(CHUNK_SIZE):
                received += len(chunk)
                yield chunk
        except httpx.HTTPError as exc:
            raise AssetDownloadError(
                f"GET {self.url}: body broke off after {received} bytes "
                f"(from offset {self.offset}): {_describe(exc)}"
            ) from exc


class RegistryClient:
    """Pull-side client for one repository. Use as `async with RegistryClient(ref) as c:`.

    `ca_bundle`, `timeout` and the connection limits apply to the client created here;
    a caller-provided `client` keeps its own settings and is not closed by `aclose`.
    Credentials go only to `ref.host` (and to the token realm it names).
    """

    def __init__(
        self,
        ref: RegistryRef,
        *,
        credentials: Credentials | None = None,
        ca_bundle: Path | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy = RetryPolicy(),  # frozen, so a shared default is safe
        client: httpx.AsyncClient | None = None,
        user_agent: str = "exec-sandbox-assets",
    ) -> None:
        self.ref = ref
        self._auth = RegistryAuth(ref.host, credentials, scheme=ref.scheme)
        self._has_credentials = credentials is not None
        self._ca_bundle = ca_bundle
        self._timeout = timeout
        self._retry = retry
        self._client = client
        self._owns_client = client is None
        self._headers = {"User-Agent": user_agent}

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_client and self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            verify: ssl.SSLContext | bool = True
            if self._ca_bundle is not None:
                try:
                    verify = ssl.create_default_context(cafile=str(self._ca_bundle))
                except (OSError, ssl.SSLError) as exc:
                    raise ConfigError(f"cannot load CA bundle {self._ca_bundle}: {exc}") from None
            self._client = httpx.AsyncClient(
                follow_redirects=True,
                http1=True,
                http2=False,
                verify=verify,
                timeout=httpx.Timeout(self._timeout),
                # A handful of parallel blob streams plus manifest/HEAD traffic.
                limits=httpx.Limits(max_connections=16, max_keepalive_connections=8),
            )
        return self._client

    # -- public API --------------------------------------------------------------------

    async def get_manifest(self, reference: str) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of the manifest or index at a tag or digest."""
        by_digest = is_digest(reference)
        if not by_digest and not TAG_RE.fullmatch(reference):
            raise ConfigError(f"invalid manifest reference {reference!r} for {self.ref}")
        url = f"{self.ref.repo_url}/manifests/{reference}"
        headers = {"Accept": ", ".join(ACCEPT_MANIFESTS)}
        response, data = await self._read("GET", url, headers, MAX_MANIFEST_SIZE, raw=False)
        if by_digest:
            verify_bytes(data, reference, f"manifest {reference}", url)
            digest = reference
        else:
            digest = compute_digest(data)
            claimed = response.headers.get("docker-content-digest", "")
            if is_digest(claimed):
                verify_bytes(data, claimed, f"manifest {self.ref.repository}:{reference}", url)
            elif claimed:
                log.debug("ignoring malformed Docker-Content-Digest", extra={"url": url})
        media_type = response.headers.get("content-type", "").split(";")[0].strip()
        if not media_type:
            media_type = media_type_of(data, url)
        return data, media_type, digest

    async def get_blob(self, digest: str, max_size: int) -> bytes:
        """A small blob (configs, signature payloads), verified and capped at `max_size`."""
        url = self._blob_url(digest)
        _, data = await self._read("GET", url, _IDENTITY, max_size, raw=True)
        return verify_bytes(data, digest, f"blob {digest}", url)

    @contextlib.asynccontextmanager
    async def open_blob(self, digest: str, offset: int = 0) -> AsyncIterator[BlobStream]:
        """Stream a blob from `offset`; the caller hashes, caps and resumes."""
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        url = self._blob_url(digest)
        headers = dict(_IDENTITY)
        if offset > 0:
            headers["Range"] = f"bytes={offset}-"
        response = await self._exchange("GET", url, headers)
        try:
            yield self._blob_stream(response, url, offset)
        finally:
            await response.aclose()

    async def blob_exists(self, digest: str) -> bool:
        url = self._blob_url(digest)
        try:
            response = await self._exchange("HEAD", url, _IDENTITY)
        except AssetNotFoundError:
            return False
        await response.aclose()
        return True

    async def list_tags(self) -> list[str]:
        """Every tag, following `Link: <...>; rel="next"` pages (ghcr.io paginates)."""
        url = f"{self.ref.repo_url}/tags/list"
        tags: list[str] = []
        for _ in range(_MAX_TAG_PAGES):
            response, body = await self._read(
                "GET", url, {"Accept": "application/json"}, MAX_MANIFEST_SIZE, raw=False
            )
            try:
                doc: Any = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise FormatError("tag list is not valid JSON", url) from None
            page = doc.get("tags") if isinstance(doc, dict) else None
            if page is None and isinstance(doc, dict):
                page = []  # distribution sends null for a repository without tags
            if not isinstance(page, list) or not all(isinstance(t, str) for t in page):
                raise FormatError("'tags' must be a list of strings", url)
            tags.extend(page)
            link = response.links.get("next", {}).get("url")
            if not link:
                break
            next_url = response.url.join(link)
            if not self._auth.is_registry_url(next_url):
                log.warning("not following a tag page on another host", extra={"url": url})
                break
            url = str(next_url)
        return tags

    async def ping(self) -> None:
        """GET /v2/: the registry is reachable and accepts us (auth round included)."""
        await self._read("GET", f"{self.ref.base_url}/v2/", {}, _MAX_ERROR_BODY, raw=False)

    # -- internals ---------------------------------------------------------------------

    def _blob_url(self, digest: str) -> str:
        # Validated before it becomes part of a URL path.
        check_digest(digest, f"blob of {self.ref}")
        return f"{self.ref.repo_url}/blobs/{digest}"

    def _blob_stream(self, response: httpx.Response, url: str, offset: int) -> BlobStream:
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

    async def _read(
        self, method: str, url: str, headers: Mapping[str, str], cap: int, *, raw: bool
    ) -> tuple[httpx.Response, bytes]:
        """A whole (small) body, capped; body failures are retried like head failures."""
        for attempt in range(1, self._retry.attempts + 1):
            response = await self._exchange(method, url, headers)
            try:
                return response, await _read_capped(response, url, cap, raw=raw)
            except _RETRYABLE_ERRORS as exc:
                if attempt == self._retry.attempts:
                    raise self._transport_error(method, url, exc, attempt) from exc
                delay = self._retry.backoff(attempt)
                self._log_retry(method, url, attempt, delay, _describe(exc))
            finally:
                await response.aclose()
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _exchange(self, method: str, url: str, headers: Mapping[str, str]) -> httpx.Response:
        """Send with retries; return the streaming 2xx response or raise the mapped error."""
        client = self._http()
        policy = self._retry
        for attempt in range(1, policy.attempts + 1):
            last = attempt == policy.attempts
            request = client.build_request(method, url, headers={**self._headers, **headers})
            try:
                response = await client.send(
                    request, auth=self._auth, stream=True, follow_redirects=True
                )
            except TokenEndpointError as exc:
                if last or not _retryable_status(exc.status):
                    raise AuthError(f"{method} {url}: {exc}") from exc
                delay = policy.backoff(attempt)
                reason = str(exc)
            except AuthError as exc:  # a bad challenge or token answer
                raise AuthError(f"{method} {url}: {exc}") from exc
            except _RETRYABLE_ERRORS as exc:
                if last or _tls_verify_failed(exc):
                    raise self._transport_error(method, url, exc, attempt) from exc
                delay = policy.backoff(attempt)
                reason = _describe(exc)
            except httpx.HTTPError as exc:  # redirect loops, unsupported schemes, ...
                raise AssetDownloadError(f"{method} {url}: {_describe(exc)}") from exc
            else:
                status = response.status_code
                if 200 <= status < 300:
                    return response
                if last or not _retryable_status(status):
                    raise await self._status_error(method, url, response, attempt)
                asked = policy.retry_after(response.headers.get("retry-after"))
                delay = asked if asked is not None else policy.backoff(attempt)
                reason = f"{status} {response.reason_phrase}"
                await response.aclose()
            self._log_retry(method, url, attempt, delay, reason)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _log_retry(self, method: str, url: str, attempt: int, delay: float, reason: str) -> None:
        log.info(
            "registry request failed (%s); retrying in %.2fs",
            reason,
            delay,
            extra={"method": method, "url": url, "attempt": attempt},
        )

    async def _status_error(
        self, method: str, url: str, response: httpx.Response, attempts: int
    ) -> AssetError:
        try:
            reason = _error_reason(await _read_capped(response, url, _MAX_ERROR_BODY, raw=False))
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
            if not self._auth.is_registry_url(response.url):
                hint = "refused by the redirect target, which gets no registry credentials"
            elif self._has_credentials:
                hint = "credentials were refused"
            else:
                hint = f"no credentials configured for {self.ref.host}"
            return AuthError(f"{message} [{hint}]")
        return AssetDownloadError(message)

    def _transport_error(
        self, method: str, url: str, exc: Exception, attempts: int
    ) -> AssetDownloadError:
        tries = f" (after {attempts} attempts)" if attempts > 1 else ""
        if _tls_verify_failed(exc):
            return AssetDownloadError(
                f"{method} {url}: TLS certificate of {self.ref.host} not trusted "
                f"(a private CA needs a CA bundle): {_describe(exc)}"
            )
        if isinstance(exc, httpx.ConnectError):
            return AssetDownloadError(
                f"{method} {url}: registry at {self.ref.base_url} is unreachable: "
                f"{_describe(exc)}{tries}"
            )
        return AssetDownloadError(f"{method} {url}: {_describe(exc)}{tries}")


_RETRYABLE_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


def _retryable_status(status: int) -> bool:
    return status == 429 or status >= 500


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _tls_verify_failed(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLCertVerificationError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


async def _read_capped(response: httpx.Response, url: str, cap: int, *, raw: bool) -> bytes:
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


def _error_reason(body: bytes) -> str:
    """`CODE: message` from distribution's `{"errors": [...]}` body, or ""."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
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


__all__ = ["CHUNK_SIZE", "BlobStream", "RegistryClient", "RetryPolicy"]
