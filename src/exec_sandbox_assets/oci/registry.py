"""Async pull client for the OCI distribution API (no push: the publisher uses oras).

The HTTP machinery (one `httpx.AsyncClient`, the retry loop with backoff, jitter and
`Retry-After`, the mapping of statuses to the error tree) is `oci.http.HttpCore`,
shared with the GitHub Releases source; this module adds the distribution API on top:
URLs, the `Accept` list, registry auth (`RegistryAuth`) and its hints on 401/403.

    404            -> AssetNotFoundError
    401, 403       -> AuthError (after RegistryAuth's challenge round)
    anything else  -> AssetDownloadError

Bytes are never trusted unverified: manifests fetched by digest and small blobs are
checked here; streamed blobs (`open_blob`) are hashed by the caller, which also resumes
a body that broke off by opening the blob again at a new offset.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

import httpx

from exec_sandbox_assets.base import safejson
from exec_sandbox_assets.base.errors import AssetNotFoundError, ConfigError, FormatError
from exec_sandbox_assets.base.safetext import redact_url
from exec_sandbox_assets.oci.auth import Credentials, RegistryAuth
from exec_sandbox_assets.oci.bodies import CHUNK_SIZE, IDENTITY, MAX_ERROR_BODY
from exec_sandbox_assets.oci.http import HttpCore
from exec_sandbox_assets.oci.model import (
    ACCEPT_MANIFESTS,
    MAX_MANIFEST_SIZE,
    MEDIA_TYPE_INDEX,
    check_digest,
    compute_digest,
    is_digest,
    media_type_of,
    verify_bytes,
)
from exec_sandbox_assets.oci.policy import DEFAULT_POLICY, TransferPolicy
from exec_sandbox_assets.oci.reference import TAG_RE, RegistryRef
from exec_sandbox_assets.oci.retry import DEFAULT_RETRY, RetryPolicy
from exec_sandbox_assets.oci.stream import BlobStream

log = logging.getLogger(__name__)

_MAX_TAG_PAGES = 1000


class RegistryClient:
    """Pull-side client for one repository. Use as `async with RegistryClient(ref) as c:`.

    `ca_bundle`, `timeout` and the connection limits apply to the client created here;
    a caller-provided `client` keeps its own settings and is not closed by `aclose`.
    Credentials go only to `ref.host` (and to the token realm it names). `policy`
    bounds time and blocks hosts (see `oci.policy`).
    """

    def __init__(
        self,
        ref: RegistryRef,
        *,
        credentials: Credentials | None = None,
        ca_bundle: Path | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy = DEFAULT_RETRY,
        client: httpx.AsyncClient | None = None,
        user_agent: str = "exec-sandbox-assets",
        policy: TransferPolicy = DEFAULT_POLICY,
    ) -> None:
        self.ref = ref
        self._auth = RegistryAuth(ref.host, credentials, scheme=ref.scheme)
        self._has_credentials = credentials is not None
        self._core = HttpCore(
            peer="registry",
            auth=self._auth,
            auth_hint=self._auth_hint,
            ca_bundle=ca_bundle,
            timeout=timeout,
            retry=retry,
            client=client,
            user_agent=user_agent,
            policy=policy,
        )

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
        await self._core.aclose()

    # -- public API --------------------------------------------------------------------

    async def get_manifest(self, reference: str) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of the manifest or index at a tag or digest."""
        by_digest = is_digest(reference)
        if not by_digest and not TAG_RE.fullmatch(reference):
            raise ConfigError(f"invalid manifest reference {reference!r} for {self.ref}")
        url = f"{self.ref.repo_url}/manifests/{reference}"
        headers = {"Accept": ", ".join(ACCEPT_MANIFESTS)}
        response, data = await self._core.read("GET", url, headers, MAX_MANIFEST_SIZE)
        shown = redact_url(url)
        if by_digest:
            verify_bytes(data, reference, f"manifest {reference}", shown)
            digest = reference
        else:
            digest = compute_digest(data)
            claimed = response.headers.get("docker-content-digest", "")
            if is_digest(claimed):
                verify_bytes(data, claimed, f"manifest {self.ref.repository}:{reference}", shown)
            elif claimed:
                log.debug("ignoring malformed Docker-Content-Digest", extra={"url": shown})
        media_type = response.headers.get("content-type", "").split(";")[0].strip()
        if not media_type:
            media_type = media_type_of(data, shown)
        return data, media_type, digest

    async def get_referrers(self, subject_digest: str, artifact_type: str | None) -> bytes | None:
        """The referrers API's index for `subject_digest` (filtered by `artifact_type`
        when the registry applies filters), or None when the registry has no such API:
        a 404 (distribution 2.8, ghcr.io) or an answer that is not an OCI index. The
        caller then reads the fallback tag. Unverified: the caller parses and caps it."""
        check_digest(subject_digest, f"referrers of {self.ref}")
        url = f"{self.ref.repo_url}/referrers/{subject_digest}"
        if artifact_type is not None:
            url += "?" + urlencode({"artifactType": artifact_type})
        try:
            response, data = await self._core.read(
                "GET", url, {"Accept": MEDIA_TYPE_INDEX}, MAX_MANIFEST_SIZE
            )
        except AssetNotFoundError:
            return None
        media_type = response.headers.get("content-type", "").split(";")[0].strip()
        return data if media_type == MEDIA_TYPE_INDEX else None

    async def get_blob(self, digest: str, max_size: int) -> bytes:
        """A small blob (configs, signature payloads), verified and capped at `max_size`."""
        url = self._blob_url(digest)
        _, data = await self._core.read("GET", url, IDENTITY, max_size)
        return verify_bytes(data, digest, f"blob {digest}", redact_url(url))

    @contextlib.asynccontextmanager
    async def open_blob(self, digest: str, offset: int = 0) -> AsyncIterator[BlobStream]:
        """Stream a blob from `offset`; the caller hashes, caps and resumes."""
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        async with self._core.open_stream(self._blob_url(digest), offset) as stream:
            yield stream

    async def blob_exists(self, digest: str) -> bool:
        url = self._blob_url(digest)
        try:
            response = await self._core.exchange("HEAD", url, IDENTITY)
        except AssetNotFoundError:
            return False
        await response.aclose()
        return True

    async def list_tags(self) -> list[str]:
        """Every tag, following `Link: <...>; rel="next"` pages (ghcr.io paginates)."""
        url = f"{self.ref.repo_url}/tags/list"
        tags: list[str] = []
        for _ in range(_MAX_TAG_PAGES):
            response, body = await self._core.read(
                "GET", url, {"Accept": "application/json"}, MAX_MANIFEST_SIZE
            )
            doc: Any = safejson.loads(body, redact_url(url), what="tag list")
            page = doc.get("tags") if isinstance(doc, dict) else None
            if page is None and isinstance(doc, dict):
                page = []  # distribution sends null for a repository without tags
            if not isinstance(page, list) or not all(isinstance(t, str) for t in page):
                raise FormatError("'tags' must be a list of strings", redact_url(url))
            tags.extend(page)
            link = response.links.get("next", {}).get("url")
            if not link:
                break
            next_url = response.url.join(link)
            if not self._auth.is_registry_url(next_url):
                log.warning(
                    "not following a tag page on another host", extra={"url": redact_url(url)}
                )
                break
            url = str(next_url)
        return tags

    async def ping(self) -> None:
        """GET /v2/: the registry is reachable and accepts us (auth round included)."""
        await self._core.read("GET", f"{self.ref.base_url}/v2/", {}, MAX_ERROR_BODY)

    # -- internals ---------------------------------------------------------------------

    def _blob_url(self, digest: str) -> str:
        # Validated before it becomes part of a URL path.
        check_digest(digest, f"blob of {self.ref}")
        return f"{self.ref.repo_url}/blobs/{digest}"

    def _auth_hint(self, response: httpx.Response) -> str:
        if not self._auth.is_registry_url(response.url):
            return "refused by the redirect target, which gets no registry credentials"
        if self._has_credentials:
            return "credentials were refused"
        return f"no credentials configured for {self.ref.host}"


__all__ = ["CHUNK_SIZE", "BlobStream", "RegistryClient", "RetryPolicy"]
