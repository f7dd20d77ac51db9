"""What a response body is held to: never content-decoded, always capped.

Every request says `Accept-Encoding: identity` (`IDENTITY`); a response that comes
with another `Content-Encoding` anyway has that header taken off before httpx could
decode it (a 16 KiB zstd body inflates to GBs in one decoder call, before any cap can
count it) and is then refused where it would be used (`encoding_refused`). Every body
httpx reads whole by itself (redirects, 401s, token answers) is capped as raw bytes
(`guard_response`); the bodies we read are capped by `read_capped`. Also the header
parsers a hostile server could feed odd values: `Content-Length`, `Content-Range`,
and a registry's JSON `errors` body (`error_reason`).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx

from exec_sandbox_assets.base import safejson
from exec_sandbox_assets.base.errors import AssetDownloadError, FormatError, SizeLimitError
from exec_sandbox_assets.base.fsutil import CHUNK
from exec_sandbox_assets.base.safetext import clean_text, redact_url
from exec_sandbox_assets.oci.auth import BODY_CAP, REFUSED_ENCODING

CHUNK_SIZE = CHUNK
# Error bodies are read only this far, for the reason they give.
MAX_ERROR_BODY = 64 * 1024
# ASCII digits, bounded: int() refuses strings over 4300 digits with a ValueError (and
# str.isdigit() accepts "²", which int() refuses too).
_LENGTH_RE = re.compile(r"^[0-9]{1,19}$")
_CONTENT_RANGE_RE = re.compile(r"^bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)$")
# Sent on every request: blobs are compressed already (a proxy re-encoding them would
# break the digest), and a decoded body is a decompression bomb waiting to happen.
IDENTITY = {"Accept-Encoding": "identity"}


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
    "IDENTITY",
    "MAX_ERROR_BODY",
    "BodyTooLargeError",
    "content_length",
    "encoding_refused",
    "error_reason",
    "guard_response",
    "parse_content_range",
    "read_capped",
]
