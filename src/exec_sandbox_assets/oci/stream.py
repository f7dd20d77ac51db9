"""An open blob response, read as raw pieces under the transfer policy's minimum rate.

`open_blob_stream` checks what a server answered to a ranged GET (206 with a matching
`Content-Range`, or 200 when it ignored `Range`: the blob restarts at 0) and wraps
it; `BlobStream.chunks` yields its raw bytes (never content-decoded) and ends a body
that breaks off or trickles with an error only after yielding every byte received,
so the caller (which hashes, caps and resumes) loses nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import httpx

from exec_sandbox_assets.base.errors import AssetDownloadError
from exec_sandbox_assets.base.safetext import clean_text, redact_url
from exec_sandbox_assets.oci.bodies import (
    CHUNK_SIZE,
    content_length,
    encoding_refused,
    parse_content_range,
)
from exec_sandbox_assets.oci.policy import DEFAULT_POLICY, TransferPolicy
from exec_sandbox_assets.oci.retry import describe

log = logging.getLogger(__name__)

# Received bytes are handed on (written, and recorded for resume) once this many have
# arrived: a process killed mid-download loses at most this per connection, plus what
# its socket held. A fast link sends larger reads, which go on whole (up to CHUNK_SIZE).
HAND_ON = 128 * 1024


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
        """Raw bytes as sent (no content decoding), in pieces of at most CHUNK_SIZE,
        each handed on as soon as HAND_ON bytes have gathered.

        A broken body is AssetDownloadError, raised only after every byte received before
        the break was yielded, so a resume starts where the connection died. (httpx's own
        `aiter_raw(CHUNK_SIZE)` drops its partly filled buffer on an error: a cut under
        1 MiB would then make no progress at all, however often it is resumed.) So is a
        body slower than the policy's minimum rate: each `rate_window` seconds spent
        waiting must bring `min_rate * rate_window` bytes (a trickle of a byte every few
        seconds never trips a read timeout).
        """
        received = 0
        # Pieces joined once per chunk: one copy (a bytearray buffer costs three).
        pending: list[bytes] = []
        size = 0
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
                if size + len(piece) > CHUNK_SIZE and pending:
                    yield b"".join(pending)
                    pending, size = [], 0
                while len(piece) > CHUNK_SIZE:  # never from our 1 MiB reads; still
                    yield piece[:CHUNK_SIZE]
                    piece = piece[CHUNK_SIZE:]
                pending.append(piece)
                size += len(piece)
                if size >= HAND_ON:
                    yield b"".join(pending)  # one piece: returned as is, not copied
                    pending, size = [], 0
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
            yield b"".join(pending)
        if error is not None:
            raise error


def open_blob_stream(
    response: httpx.Response, url: str, offset: int, policy: TransferPolicy = DEFAULT_POLICY
) -> BlobStream:
    """The `BlobStream` of a 2xx answer to `GET url` from byte `offset`, or
    AssetDownloadError when the answer is not the blob from there."""
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
        return BlobStream(response, url, offset, parsed[2], policy)
    if status == 200:
        if offset:
            log.debug("server ignored Range; restarting at 0", extra={"url": redact_url(url)})
        return BlobStream(response, url, 0, content_length(response), policy)
    raise AssetDownloadError(f"GET {redact_url(url)}: unexpected status {status} for a blob")


__all__ = ["BlobStream", "open_blob_stream"]
