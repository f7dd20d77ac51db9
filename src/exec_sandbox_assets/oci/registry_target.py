"""Push a release to a registry with oras-py (imported only here).

What oras-py 0.2.43 does and what we do around it:
- blobs: its `chunked_upload` (POST, PATCH per chunk, PUT), with 4 MiB chunks
  (ghcr.io refuses larger PATCH bodies; the default upload reads the whole file);
  existing blobs are skipped after a HEAD, so re-runs upload nothing;
- manifests, the index and tags: PUT with its raw request helper and our own bytes
  and Content-Type (its `push` has no artifactType and its schema check refuses
  indexes);
- its `do_request` retries every failure 5 times sleeping 3+5+11+29+83 s (a closed
  port takes over two minutes to report) and sends requests without a timeout.
  We install our own request policy on the client instance: oras's request + auth
  round (the undecorated function), a timeout on every request, a few short
  retries for idempotent requests only (a failed blob upload is restarted whole);
- its token auth caches one token per client, scoped by the first 401: a pull-only
  token then fails every push. One client per repository, a push-scoped probe
  first (start and cancel an upload), and on a 401 with a cached token we drop it
  once so oras fetches one for the scope the registry now asks for;
- it reads `~/.docker/config.json` only (not `$DOCKER_CONFIG`) and its Basic
  backend crashes without credentials, so credentials are found here: explicit
  arguments, else the `auths` entry of the docker config (`docker_config`, else
  `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`), read by the pull side's
  reader. `GET /v2/` tells which auth scheme the registry wants.
"""

from __future__ import annotations

import base64
import logging
import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import oras.provider
import requests
import requests.adapters

from exec_sandbox_assets.config import docker_config_path
from exec_sandbox_assets.errors import (
    AssetDownloadError,
    AssetError,
    AssetNotFoundError,
    AuthError,
    ConfigError,
    SizeLimitError,
    TransportError,
)
from exec_sandbox_assets.oci.auth import Credentials
from exec_sandbox_assets.oci.credentials import find_credentials
from exec_sandbox_assets.oci.model import (
    ACCEPT_MANIFESTS,
    MAX_MANIFEST_SIZE,
    sha256_digest,
    verify_bytes,
)
from exec_sandbox_assets.oci.reference import parse_registry_ref
from exec_sandbox_assets.oci.target import PushStats

log = logging.getLogger(__name__)

CHUNK_SIZE = 4 * 1024 * 1024  # ghcr.io's limit for one PATCH
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 120.0
RETRY_DELAYS = (0.5, 1.0, 2.0)  # idempotent requests: on connection errors, 429, 5xx
UPLOAD_ATTEMPTS = 3
_MAX_RETRY_AFTER = 10.0
_IDEMPOTENT = ("GET", "HEAD", "DELETE")


class _TimeoutAdapter(requests.adapters.HTTPAdapter):
    """Gives every request a timeout (oras passes none) and leaves retries to us."""

    def __init__(self, timeout: tuple[float, float]) -> None:
        super().__init__(max_retries=0)
        self._timeout = timeout

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: Any = True,
        cert: Any = None,
        proxies: Any = None,
    ) -> requests.Response:
        return super().send(
            request,
            stream=stream,
            timeout=timeout or self._timeout,
            verify=verify,
            cert=cert,
            proxies=proxies,
        )


def _reason(exc: BaseException) -> str:
    """The useful end of a requests error ("Connection refused", not three wrappers)."""
    text = str(exc)
    match = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if match:
        return match.group(1).strip()
    if isinstance(exc, requests.Timeout):
        return "timed out"
    return text[:300]


def _registry_errors(resp: requests.Response) -> str:
    """The registry's own error codes and messages, when it sent the standard body."""
    try:
        doc = resp.json()
        errors = doc.get("errors") if isinstance(doc, dict) else None
        parts = [
            f"{e.get('code', '?')}: {e.get('message', '')}".strip()
            for e in errors or []
            if isinstance(e, dict)
        ]
    except ValueError:
        parts = []
    return "; ".join(parts) or (resp.text[:200].strip() if resp.text else resp.reason or "")


class RegistryTarget:
    """A repository on a registry, written with oras-py (one client per repository)."""

    def __init__(
        self,
        ref: str,
        *,
        username: str | None = None,
        password: str | None = None,
        ca_bundle: Path | None = None,
        docker_config: Path | None = None,
        work_dir: Path | None = None,
        chunk_size: int = CHUNK_SIZE,
        timeout: tuple[float, float] = (CONNECT_TIMEOUT, READ_TIMEOUT),
    ) -> None:
        parsed = parse_registry_ref(ref)
        if parsed.tag or parsed.digest:
            raise ConfigError(
                f"target {ref!r}: give the repository without a tag or digest; "
                "the release is tagged vVERSION"
            )
        if (username is None) != (password is None):
            raise ConfigError("give both a registry username and a password, or neither")
        if not 0 < chunk_size <= CHUNK_SIZE:
            raise ConfigError(f"chunk size must be 1..{CHUNK_SIZE} bytes")
        self.ref = parsed
        self.name = str(parsed)
        self.stats = PushStats()
        self._chunk_size = chunk_size
        self._work_dir = work_dir
        self._host = parsed.host
        self._repo_url = parsed.repo_url
        tls_verify: bool | str = str(ca_bundle) if ca_bundle is not None else True
        if ca_bundle is not None and not Path(ca_bundle).is_file():
            raise ConfigError(f"CA bundle {ca_bundle} does not exist")

        scheme = self._probe(tls_verify, timeout)
        creds: Credentials | None
        if username is not None and password is not None:
            creds, self._creds_source = Credentials(username, password), f"given for {username}"
        else:
            config = docker_config or docker_config_path()
            creds, self._creds_source = (
                find_credentials(parsed.host, config),
                f"from {config}",
            )
        if scheme == "basic" and creds is None:
            raise AuthError(self._login_hint("requires a login (HTTP Basic) and no credentials"))

        self._client: Any = oras.provider.Registry(
            hostname=parsed.host,
            insecure=parsed.scheme == "http",
            tls_verify=tls_verify,
            auth_backend="basic" if scheme == "basic" else "token",
        )
        adapter = _TimeoutAdapter(timeout)
        self._client.session.mount("http://", adapter)
        self._client.session.mount("https://", adapter)
        self._basic: str | None = None
        if creds is not None:
            self._client.auth.set_basic_auth(creds.username, creds.password)
            if scheme == "basic":
                # Sent up front: oras would otherwise send every request twice (401 first).
                pair = f"{creds.username}:{creds.password}".encode()
                self._basic = "Basic " + base64.b64encode(pair).decode()
        self._has_creds = creds is not None
        self._container = self._client.get_container(f"{parsed.host}/{parsed.repository}")
        # oras's chunked_upload calls self.do_request: route it through our policy.
        self._oras_request = getattr(
            type(self._client).do_request, "__wrapped__", type(self._client).do_request
        )
        self._client.do_request = self._request
        try:
            self._check_push_access()
        except BaseException:
            self._client.session.close()
            raise

    # -- connection ------------------------------------------------------------

    def _login_hint(self, what: str) -> str:
        return (
            f"registry {self._host} {what} for {self.ref.repository}; pass --username NAME "
            f"--password-stdin (the password or token on stdin), or log in with "
            f"`docker login {self._host}` (read from $DOCKER_CONFIG/config.json or "
            "~/.docker/config.json)"
        )

    def _probe(self, tls_verify: bool | str, timeout: tuple[float, float]) -> str:
        """GET /v2/: reachable, a registry, and which auth scheme it wants."""
        url = f"{self.ref.base_url}/v2/"
        resp: requests.Response | None = None
        for delay in (*RETRY_DELAYS, None):
            try:
                resp = requests.get(url, timeout=timeout, verify=tls_verify, allow_redirects=False)
            except requests.exceptions.SSLError as exc:
                raise TransportError(
                    f"TLS error talking to registry {self._host} ({url}): {exc}; for a private "
                    "CA pass --ca-bundle FILE; for a plain-HTTP registry write http://HOST/REPO"
                ) from None
            except requests.RequestException as exc:
                why = _reason(exc)
            else:
                if resp.status_code < 500:
                    break
                why = f"HTTP {resp.status_code}"
            if delay is None:
                raise AssetDownloadError(f"cannot reach registry {self._host} ({url}): {why}")
            time.sleep(delay)
        assert resp is not None
        if resp.status_code == 200:
            return "none"
        if resp.status_code == 401:
            challenge = resp.headers.get("WWW-Authenticate", "")
            scheme = challenge.split(" ", 1)[0].lower()
            if scheme in ("bearer", "basic"):
                return "token" if scheme == "bearer" else "basic"
            raise AuthError(f"registry {self._host}: unsupported auth challenge {challenge!r}")
        raise TransportError(
            f"{url} answered HTTP {resp.status_code}: not an OCI registry (distribution API v2)?"
        )

    def _check_push_access(self) -> None:
        """Start and cancel a blob upload: proves push rights before any work is done,
        and makes the one token oras caches a push-scoped one."""
        resp = self._request(
            f"{self._repo_url}/blobs/uploads/", "POST", headers={"Content-Length": "0"}
        )
        if resp.status_code != 202:
            raise self._error(resp, "starting an upload")
        self._cancel_upload(resp, "the probe upload")

    def _cancel_upload(self, started: requests.Response, what: str) -> None:
        """DELETE the upload session a 202 opened (best effort: sessions expire anyway)."""
        location = started.headers.get("Location")
        if not location:
            return
        url = location if location.startswith("http") else f"{self.ref.base_url}{location}"
        try:
            self._request(url, "DELETE")
        except AssetError as exc:
            log.debug("could not cancel %s: %s", what, exc)

    # -- requests --------------------------------------------------------------

    def _send(
        self,
        url: str,
        method: str,
        data: Any,
        headers: Mapping[str, str],
        json_body: Any,
        stream: bool,
    ) -> requests.Response:
        hdrs = dict(headers)
        if self._basic is not None:
            hdrs.setdefault("Authorization", self._basic)
        try:
            return self._oras_request(self._client, url, method, data, hdrs, json_body, stream)  # type: ignore[no-any-return]
        except ValueError as exc:
            # oras: "Cannot respond to request for authentication." (token refused).
            if "authentication" in str(exc):
                raise AuthError(
                    self._login_hint(
                        "refused the credentials"
                        if self._has_creds
                        else "requires a login and none was found"
                    )
                ) from None
            raise

    def _request(
        self,
        url: str,
        method: str = "GET",
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        stream: bool = False,
    ) -> requests.Response:
        """oras's request + auth round under our policy (same signature as its helper)."""
        retriable = method in _IDEMPOTENT or (method == "PUT" and "/manifests/" in url)
        delays = RETRY_DELAYS if retriable else ()
        for attempt in range(len(delays) + 1):
            resp: requests.Response | None = None
            had_token = getattr(self._client.auth, "token", None) is not None
            try:
                resp = self._send(url, method, data, headers or {}, json, stream)
                if resp.status_code == 401 and had_token:
                    # The cached token's scope is too narrow: drop it, oras gets a new one.
                    self._client.auth.token = None
                    resp = self._send(url, method, data, headers or {}, json, stream)
            except requests.exceptions.SSLError as exc:
                raise TransportError(f"TLS error talking to {self._host}: {exc}") from None
            except requests.RequestException as exc:
                if attempt == len(delays):
                    raise AssetDownloadError(
                        f"registry {self._host}: {method} {url} failed: {_reason(exc)}"
                    ) from None
                log.info("retrying %s %s: %s", method, url, _reason(exc))
            else:
                if resp.status_code in (401, 403):
                    raise AuthError(self._refused(resp, method, url))
                if (resp.status_code != 429 and resp.status_code < 500) or attempt == len(delays):
                    return resp
                log.info("retrying %s %s: HTTP %d", method, url, resp.status_code)
            delay = delays[attempt]
            after = resp.headers.get("Retry-After", "") if resp is not None else ""
            if after.isdigit():
                delay = min(float(after), _MAX_RETRY_AFTER)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _refused(self, resp: requests.Response, method: str, url: str) -> str:
        why = (
            f"the credentials {self._creds_source} were refused or lack push rights"
            if self._has_creds
            else "no credentials were given"
        )
        return self._login_hint(
            f"refused {method} {url.removeprefix(self.ref.base_url)} "
            f"(HTTP {resp.status_code}: {_registry_errors(resp)}); {why}"
        )

    def _error(self, resp: requests.Response, what: str) -> AssetError:
        message = (
            f"registry {self._host}: {what} in {self.ref.repository} failed "
            f"(HTTP {resp.status_code}: {_registry_errors(resp)})"
        )
        if resp.status_code == 404:
            return AssetNotFoundError(message)
        if resp.status_code == 429 or resp.status_code >= 500:
            return AssetDownloadError(message)
        return TransportError(message)

    # -- Target ----------------------------------------------------------------

    def has_blob(self, digest: str) -> bool:
        resp = self._request(f"{self._repo_url}/blobs/{digest}", "HEAD")
        if resp.status_code == 200:
            return True
        if resp.status_code == 404:
            return False
        raise self._error(resp, f"checking blob {digest}")

    def _blob_size(self, digest: str) -> int | None:
        resp = self._request(f"{self._repo_url}/blobs/{digest}", "HEAD")
        if resp.status_code != 200:
            return None
        length = resp.headers.get("Content-Length", "")
        return int(length) if length.isdigit() else None

    def mount_blob(self, digest: str, from_repository: str) -> bool:
        """Cross-repository mount on this registry: `POST .../blobs/uploads/?mount=D&from=R`.

        True when the registry linked the blob (201, nothing uploaded); False when it
        cannot (it answers 202 with an upload session, cancelled here): copy it then.
        """
        resp = self._request(
            f"{self._repo_url}/blobs/uploads/?mount={digest}&from={from_repository}",
            "POST",
            headers={"Content-Length": "0"},
        )
        if resp.status_code == 201:
            log.info("mounted %s from %s into %s", digest, from_repository, self.name)
            return True
        if resp.status_code != 202:
            raise self._error(resp, f"mounting {digest} from {from_repository}")
        self._cancel_upload(resp, "the mount's upload session")
        return False

    def push_blob(self, path: Path, digest: str, size: int) -> None:
        if self.has_blob(digest):
            self.stats.blobs_skipped += 1
            return
        layer = {"digest": digest, "size": size}
        for attempt in range(1, UPLOAD_ATTEMPTS + 1):
            try:
                resp = self._client.chunked_upload(
                    str(path), self._container, layer, chunk_size=self._chunk_size
                )
            except (AssetDownloadError, requests.RequestException, ValueError) as exc:
                # ValueError: oras's own check of a PATCH answer; the session is lost.
                if attempt == UPLOAD_ATTEMPTS:
                    raise AssetDownloadError(
                        f"registry {self._host}: uploading {path.name} ({digest}) failed "
                        f"{attempt} times; last: {exc}"
                    ) from None
                log.info("restarting the upload of %s: %s", digest, exc)
                time.sleep(RETRY_DELAYS[min(attempt, len(RETRY_DELAYS)) - 1])
                continue
            if resp.status_code == 201:
                break
            error = self._error(resp, f"uploading {path.name} ({digest})")
            if attempt == UPLOAD_ATTEMPTS or not isinstance(error, AssetDownloadError):
                raise error
        stored = self._blob_size(digest)
        if stored != size:
            raise TransportError(
                f"registry {self._host}: blob {digest} reads back as {stored} bytes, "
                f"expected {size}"
            )
        self.stats.blobs_uploaded += 1
        self.stats.bytes_uploaded += size
        log.info("uploaded %s (%d bytes) to %s", digest, size, self.name)

    def push_bytes(self, data: bytes, media_type_for_log: str) -> str:
        digest = sha256_digest(data)
        if self.has_blob(digest):
            self.stats.blobs_skipped += 1
            return digest
        # oras uploads from a path; these blobs are a few hundred bytes.
        with tempfile.NamedTemporaryFile(dir=self._work_dir, prefix=".blob-") as f:
            f.write(data)
            f.flush()
            self.push_blob(Path(f.name), digest, len(data))
        log.debug("pushed %s %s", media_type_for_log, digest)
        return digest

    def put_manifest(self, data: bytes, media_type: str, reference: str | None) -> None:
        digest = sha256_digest(data)
        ref = reference or digest
        resp = self._request(
            f"{self._repo_url}/manifests/{ref}",
            "PUT",
            data=data,
            headers={"Content-Type": media_type},
        )
        if resp.status_code not in (200, 201):
            raise self._error(resp, f"storing {media_type} {digest} as {ref}")
        stored = resp.headers.get("Docker-Content-Digest")
        if stored and stored != digest:
            raise TransportError(
                f"registry {self._host} stored {ref} as {stored}, not {digest}: it rewrote "
                "the manifest, which would break the signature"
            )

    def tag(self, data: bytes, media_type: str, tag: str) -> None:
        self.put_manifest(data, media_type, tag)

    def read_manifest(self, reference: str) -> bytes | None:
        resp = self._request(
            f"{self._repo_url}/manifests/{reference}",
            "GET",
            headers={"Accept": ", ".join(ACCEPT_MANIFESTS)},
        )
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise self._error(resp, f"reading manifest {reference}")
        data = resp.content
        if len(data) > MAX_MANIFEST_SIZE:
            raise SizeLimitError(f"{self.name}: manifest {reference} is {len(data)} bytes")
        if reference.startswith("sha256:"):
            verify_bytes(data, reference, "manifest", self.name)
        return data

    def read_blob(self, digest: str, max_size: int) -> bytes:
        resp = self._request(f"{self._repo_url}/blobs/{digest}", "GET", stream=True)
        try:
            if resp.status_code != 200:
                raise self._error(resp, f"reading blob {digest}")
            data = resp.raw.read(max_size + 1, decode_content=True)
        finally:
            resp.close()
        if len(data) > max_size:
            raise SizeLimitError(f"{self.name}: blob {digest} exceeds {max_size} bytes")
        return verify_bytes(bytes(data), digest, "blob", self.name)

    def close(self, ok: bool) -> None:
        self._client.session.close()


__all__ = ["CHUNK_SIZE", "RegistryTarget"]
