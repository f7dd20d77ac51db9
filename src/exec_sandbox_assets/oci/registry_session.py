"""oras-py's client for one registry repository, connected and under our request policy.

What oras-py 0.2.43 does and what we do around it here (uploads and manifest writes
are `oci.registry_target`):
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
  arguments, else the auth files the caller lists (`auth_files`: `config.auth_files`,
  docker's config.json among them), read by the pull side's reader. `GET /v2/` tells which auth scheme the registry wants.

`RegistrySession.connect` does that network I/O (probe, login, push-access check);
constructing a `RegistrySession` does none.
"""

from __future__ import annotations

import base64
import logging
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import oras.provider
import requests
import requests.adapters

from exec_sandbox_assets.base.errors import (
    AssetDownloadError,
    AssetError,
    AssetNotFoundError,
    AuthError,
    ConfigError,
    TransportError,
)
from exec_sandbox_assets.base.safetext import clean_text
from exec_sandbox_assets.oci.auth import Credentials
from exec_sandbox_assets.oci.bodies import MAX_ERROR_BODY, error_reason
from exec_sandbox_assets.oci.credentials import find_credentials
from exec_sandbox_assets.oci.reference import RegistryRef
from exec_sandbox_assets.oci.retry import HTTPS_SERVER_REPLY

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 120.0
RETRY_DELAYS = (0.5, 1.0, 2.0)  # idempotent requests: on connection errors, 429, 5xx
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
    return clean_text(text, 300)


def _registry_errors(resp: requests.Response) -> str:
    """The registry's own error codes and messages, when it sent the standard body (read
    and cleaned as on the pull side: `bodies.error_reason`), else its text, cleaned."""
    body = resp.content[:MAX_ERROR_BODY]
    fallback = body.decode("utf-8", "replace").strip() or resp.reason or ""
    return error_reason(body) or clean_text(fallback, 200)


def login_hint(ref: RegistryRef, what: str) -> str:
    return (
        f"registry {ref.host} {what} for {ref.repository}; pass --username NAME "
        f"--password-stdin (the password or token on stdin), or log in with "
        f"`docker login {ref.host}` (read from $DOCKER_CONFIG/config.json or "
        "~/.docker/config.json)"
    )


def probe(ref: RegistryRef, tls_verify: bool | str, timeout: tuple[float, float]) -> str:
    """GET /v2/: reachable, a registry, and which auth scheme it wants."""
    host = ref.host
    url = f"{ref.base_url}/v2/"
    resp: requests.Response | None = None
    for delay in (*RETRY_DELAYS, None):
        try:
            resp = requests.get(url, timeout=timeout, verify=tls_verify, allow_redirects=False)
        except requests.exceptions.SSLError as exc:
            raise TransportError(
                f"TLS error talking to registry {host} ({url}): {exc}; for a private "
                f"CA pass --ca-bundle FILE; for a plain-HTTP registry write "
                f"http://{host}/{ref.repository}"
            ) from None
        except requests.RequestException as exc:
            why = _reason(exc)
        else:
            if resp.status_code < 500:
                break
            why = f"HTTP {resp.status_code}"
        if delay is None:
            raise AssetDownloadError(f"cannot reach registry {host} ({url}): {why}")
        time.sleep(delay)
    assert resp is not None
    if resp.status_code == 200:
        return "none"
    if resp.status_code == 401:
        challenge = resp.headers.get("WWW-Authenticate", "")
        scheme = challenge.split(" ", 1)[0].lower()
        if scheme in ("bearer", "basic"):
            return "token" if scheme == "bearer" else "basic"
        raise AuthError(f"registry {host}: unsupported auth challenge {challenge!r}")
    if resp.status_code == 400 and HTTPS_SERVER_REPLY in resp.content[:MAX_ERROR_BODY]:
        raise TransportError(
            f"{url} answered HTTP 400: it serves https, not http; write "
            f"https://{host}/{ref.repository}"
        )
    raise TransportError(
        f"{url} answered HTTP {resp.status_code}: not an OCI registry (distribution API v2)?"
    )


class RegistrySession:
    """oras's client for one repository, its requests routed through `request`."""

    def __init__(
        self,
        ref: RegistryRef,
        client: Any,
        *,
        basic: str | None = None,
        has_creds: bool = False,
        creds_source: str = "",
    ) -> None:
        """Wrap an oras client (no I/O here: `connect` probes and logs in)."""
        self.ref = ref
        self.client = client
        self.container = client.get_container(f"{ref.host}/{ref.repository}")
        self._host = ref.host
        self._basic = basic
        self._has_creds = has_creds
        self._creds_source = creds_source
        # oras's chunked_upload calls self.do_request: route it through our policy.
        self._oras_request = getattr(
            type(client).do_request, "__wrapped__", type(client).do_request
        )
        client.do_request = self.request

    @classmethod
    def connect(
        cls,
        ref: RegistryRef,
        *,
        username: str | None = None,
        password: str | None = None,
        ca_bundle: Path | None = None,
        auth_files: Sequence[Path] = (),
        timeout: tuple[float, float] = (CONNECT_TIMEOUT, READ_TIMEOUT),
    ) -> RegistrySession:
        """Probe the registry, find credentials, log in and prove push rights."""
        tls_verify: bool | str = str(ca_bundle) if ca_bundle is not None else True
        if ca_bundle is not None and not Path(ca_bundle).is_file():
            raise ConfigError(f"CA bundle {ca_bundle} does not exist")

        scheme = probe(ref, tls_verify, timeout)
        creds: Credentials | None
        if username is not None and password is not None:
            creds, creds_source = Credentials(username, password), f"given for {username}"
        else:
            searched = ", ".join(map(str, auth_files)) or "no auth file"
            creds, creds_source = find_credentials(ref.host, auth_files), f"from {searched}"
        if scheme == "basic" and creds is None:
            raise AuthError(login_hint(ref, "requires a login (HTTP Basic) and no credentials"))

        client: Any = oras.provider.Registry(
            hostname=ref.host,
            insecure=ref.scheme == "http",
            tls_verify=tls_verify,
            auth_backend="basic" if scheme == "basic" else "token",
        )
        adapter = _TimeoutAdapter(timeout)
        client.session.mount("http://", adapter)
        client.session.mount("https://", adapter)
        basic: str | None = None
        if creds is not None:
            client.auth.set_basic_auth(creds.username, creds.password)
            if scheme == "basic":
                # Sent up front: oras would otherwise send every request twice (401 first).
                pair = f"{creds.username}:{creds.password}".encode()
                basic = "Basic " + base64.b64encode(pair).decode()
        try:
            session = cls(
                ref, client, basic=basic, has_creds=creds is not None, creds_source=creds_source
            )
            session.check_push_access()
        except BaseException:
            client.session.close()
            raise
        return session

    def close(self) -> None:
        self.client.session.close()

    def check_push_access(self) -> None:
        """Start and cancel a blob upload: proves push rights before any work is done,
        and makes the one token oras caches a push-scoped one."""
        resp = self.request(
            f"{self.ref.repo_url}/blobs/uploads/", "POST", headers={"Content-Length": "0"}
        )
        if resp.status_code != 202:
            raise self.error(resp, "starting an upload")
        self.cancel_upload(resp, "the probe upload")

    def upload_url(self, resp: requests.Response) -> str | None:
        """Where an upload session continues: the answer's Location, made absolute."""
        location = resp.headers.get("Location")
        if not location:
            return None
        return location if location.startswith("http") else f"{self.ref.base_url}{location}"

    def cancel_upload(self, started: requests.Response, what: str) -> None:
        """DELETE the upload session a 202 opened (best effort: sessions expire anyway)."""
        url = self.upload_url(started)
        if url is None:
            return
        try:
            self.request(url, "DELETE")
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
            return self._oras_request(self.client, url, method, data, hdrs, json_body, stream)  # type: ignore[no-any-return]
        except ValueError as exc:
            # oras: "Cannot respond to request for authentication." (token refused).
            if "authentication" in str(exc):
                raise AuthError(
                    login_hint(
                        self.ref,
                        "refused the credentials"
                        if self._has_creds
                        else "requires a login and none was found",
                    )
                ) from None
            raise

    def request(
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
            had_token = getattr(self.client.auth, "token", None) is not None
            try:
                resp = self._send(url, method, data, headers or {}, json, stream)
                if resp.status_code == 401 and had_token:
                    # The cached token's scope is too narrow: drop it, oras gets a new one.
                    self.client.auth.token = None
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
        return login_hint(
            self.ref,
            f"refused {method} {url.removeprefix(self.ref.base_url)} "
            f"(HTTP {resp.status_code}: {_registry_errors(resp)}); {why}",
        )

    def error(self, resp: requests.Response, what: str) -> AssetError:
        message = (
            f"registry {self._host}: {what} in {self.ref.repository} failed "
            f"(HTTP {resp.status_code}: {_registry_errors(resp)})"
        )
        if resp.status_code == 404:
            return AssetNotFoundError(message)
        if resp.status_code == 429 or resp.status_code >= 500:
            return AssetDownloadError(message)
        return TransportError(message)


__all__ = [
    "CONNECT_TIMEOUT",
    "READ_TIMEOUT",
    "RETRY_DELAYS",
    "RegistrySession",
    "login_hint",
    "probe",
]
