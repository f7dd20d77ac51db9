"""Registry authentication: docker config.json credentials and the 401 challenge round.

`RegistryAuth` is an `httpx.Auth`: the request goes out (with a cached token or Basic
header when one is known for it); on 401 the `WWW-Authenticate` challenge says what to
do. Bearer: GET the realm with `service` and `scope` (Basic credentials to the realm
only when we have some), then retry with the token. Basic: retry with the credentials.

Credentials never leave the registry host: the flow adds nothing to a request for
another host, and ignores a challenge that came from another host (a redirect target
such as a blob CDN). httpx itself strips `Authorization` when it follows a redirect to
another origin, so a redirected blob request carries no registry token.

The one exception is the token realm, which the registry itself names and which is
often another host (Docker Hub: auth.docker.io). Basic credentials go there, as docker
and containerd send them: the registry we were configured for chose it. They never go
to a plain-HTTP realm of a TLS registry, and the token it answers is only ever sent
back to the registry host. Bodies read here are capped (`BODY_CAP`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import time
from collections.abc import AsyncGenerator, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from exec_sandbox_assets.base import safejson
from exec_sandbox_assets.base.errors import AuthError, ConfigError, FormatError
from exec_sandbox_assets.base.safetext import clean_text, redact_url

log = logging.getLogger(__name__)

DEFAULT_TOKEN_TTL = 60.0
# Refresh a little before the registry would start refusing the token.
_EXPIRY_MARGIN = 5.0
_MAX_TOKEN_RESPONSE = 1024 * 1024
# Request extension naming the most body bytes to accept (see oci.bodies.guard_response).
BODY_CAP = "exec_sandbox_assets.body_cap"
# Response extension: a Content-Encoding the response hook took off, never decoded.
REFUSED_ENCODING = "exec_sandbox_assets.content_encoding"
_DEFAULT_PORTS = {"http": 80, "https": 443}
# `/v2/<name>/(manifests|blobs|tags)/...` -> the repository a request is scoped to.
_REPO_PATH_RE = re.compile(r"^/v2/(.+?)/(?:manifests|blobs|tags)/")


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)


def _normalize_config_host(key: str) -> str:
    # docker writes `host`, `https://host`, `http://host` and `https://host/v1/` alike.
    text = key.strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    return text.split("/", 1)[0].lower()


_warned_helpers: set[tuple[str, str]] = set()


def load_docker_credentials(host: str, config_path: Path | None) -> Credentials | None:
    """Credentials for `host` (host[:port]) from a docker `config.json`, or None.

    A missing file means no credentials; a malformed one is a ConfigError. Credential
    helpers (`credsStore`, `credHelpers`) are not run: the pull path executes no
    external programs.
    """
    if config_path is None:
        return None
    try:
        raw = config_path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read docker config {config_path}: {exc}") from None
    try:
        # The user's own file, but often written by other tools: parsed as untrusted.
        doc = safejson.loads_object(raw, f"docker config {config_path}", what="docker config")
    except FormatError as exc:
        raise ConfigError(str(exc)) from None
    auths = doc.get("auths", {})
    if not isinstance(auths, dict):
        raise ConfigError(f"docker config {config_path}: 'auths' must be an object")

    wanted = host.lower()
    # An exact key wins over the URL spellings of the same host.
    keys = sorted(
        (k for k in auths if isinstance(k, str) and _normalize_config_host(k) == wanted),
        key=lambda k: k.lower() != wanted,
    )
    for key in keys:
        creds = _entry_credentials(auths[key], config_path, key)
        if creds is not None:
            return creds

    helpers = doc.get("credHelpers")
    helper = helpers.get(host) if isinstance(helpers, dict) else None
    store = doc.get("credsStore")
    if isinstance(helper, str) or isinstance(store, str):
        name = helper if isinstance(helper, str) else store
        marker = (str(config_path), host)
        if marker not in _warned_helpers:
            _warned_helpers.add(marker)
            log.debug(
                "docker credential helpers are not supported; pulling anonymously",
                extra={"config": str(config_path), "host": host, "helper": name},
            )
    return None


def _entry_credentials(entry: object, path: Path, key: str) -> Credentials | None:
    where = f"docker config {path}, auths[{key!r}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected an object")
    token = entry.get("identitytoken")
    if isinstance(token, str) and token:
        return Credentials("<token>", token)
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            decoded = base64.b64decode(auth, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise ConfigError(f"{where}: 'auth' is not base64 of 'user:password'") from None
        user, colon, password = decoded.partition(":")
        if not colon or not user:
            raise ConfigError(f"{where}: 'auth' does not decode to 'user:password'")
        return Credentials(user, password)
    username, secret = entry.get("username"), entry.get("password")
    if isinstance(username, str) and username and isinstance(secret, str):
        return Credentials(username, secret)
    # An empty entry is what docker leaves behind when a helper holds the secret.
    return None


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lowercase: "bearer", "basic", ...
    params: dict[str, str]


_TCHARS = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_PARAM_RE = re.compile(rf'\s*({_TCHARS})\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,=][^\s,]*|)\s*(?:,|$)')
_SCHEME_RE = re.compile(rf"[\s,]*({_TCHARS})(?=[\s,]|$)\s*")


def parse_www_authenticate(value: str) -> list[Challenge]:
    """Parse one `WWW-Authenticate` value into its challenges (RFC 7235).

    Handles quoted values with commas and backslash escapes, several challenges in
    one header, and token68 forms (kept under the key "").
    """
    challenges: list[Challenge] = []
    pos = 0
    while pos < len(value):
        m = _SCHEME_RE.match(value, pos)
        if not m:
            break
        scheme, pos = m.group(1).lower(), m.end()
        params: dict[str, str] = {}
        while pos < len(value):
            p = _PARAM_RE.match(value, pos)
            if not p:
                # token68 (`Basic dXNlcg==`) or the start of the next challenge.
                t = re.match(r"\s*([A-Za-z0-9\-._~+/]+=*)\s*(?:,|$)", value[pos:])
                if t and not params and "=" in t.group(1):
                    params[""] = t.group(1)
                    pos += t.end()
                break
            raw = p.group(2)
            if raw.startswith('"'):
                raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
            params[p.group(1).lower()] = raw
            pos = p.end()
        challenges.append(Challenge(scheme, params))
    return challenges


def _port_or_default(url: httpx.URL) -> int | None:
    return url.port or _DEFAULT_PORTS.get(url.scheme)


def _request_scope(request: httpx.Request) -> str:
    """The token scope a request needs, as distribution spells it; "" for `/v2/`."""
    m = _REPO_PATH_RE.match(request.url.path)
    if not m:
        return ""
    actions = "pull" if request.method in ("GET", "HEAD") else "pull,push"
    return f"repository:{m.group(1)}:{actions}"


@dataclass
class _Token:
    header: str
    expires_at: float


class RegistryAuth(httpx.Auth):
    """Bearer-token and Basic auth for one registry host. Async only.

    `host` is `host[:port]` as in the reference; `scheme`, when given, must match too.
    Tokens are cached per scope until `expires_in` (default 60 s); concurrent requests
    for the same scope wait for one token fetch instead of each fetching one.
    """

    def __init__(
        self, host: str, credentials: Credentials | None = None, *, scheme: str | None = None
    ) -> None:
        url = httpx.URL(f"{scheme or 'https'}://{host}/")
        self._host = url.host
        self._port = url.port  # None: whatever the default of the request's scheme is
        self._scheme = scheme
        self._credentials = credentials
        self._tokens: dict[str, _Token] = {}
        # Request-derived scope -> the scope string the registry challenged with.
        self._scope_alias: dict[str, str] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._basic = False  # the registry asked for Basic: send it up front from now on

    def is_registry_url(self, url: httpx.URL) -> bool:
        if url.host != self._host or (self._scheme and url.scheme != self._scheme):
            return False
        if self._port is None:
            return url.port is None or url.port == _DEFAULT_PORTS.get(url.scheme)
        return _port_or_default(url) == self._port

    def _basic_header(self) -> str | None:
        if self._credentials is None:
            return None
        c = self._credentials
        return "Basic " + base64.b64encode(f"{c.username}:{c.password}".encode()).decode()

    def _cached(self, scope: str) -> str | None:
        token = self._tokens.get(self._scope_alias.get(scope, scope))
        if token is None or time.monotonic() >= token.expires_at:
            return None
        return token.header

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        raise RuntimeError("RegistryAuth is async-only: use it with httpx.AsyncClient")
        yield request  # pragma: no cover  (makes this a generator, as httpx expects)

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        if not self.is_registry_url(request.url):
            yield request
            return
        scope = _request_scope(request)
        sent = self._cached(scope) or (self._basic_header() if self._basic else None)
        if sent:
            request.headers["Authorization"] = sent
        response = yield request
        # A 401 from a redirect target (another host) is not ours to answer.
        if response.status_code != 401 or not self.is_registry_url(response.url):
            return
        challenges = [
            c
            for value in response.headers.get_list("www-authenticate")
            for c in parse_www_authenticate(value)
        ]
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        if bearer is not None:
            key = bearer.params.get("scope", scope)
            self._scope_alias[scope] = key
            async with self._locks.setdefault(key, asyncio.Lock()):
                header = self._cached(scope)
                # Fetch unless another coroutine got a fresh token while we waited.
                if header is None or header == sent:
                    self._tokens.pop(key, None)
                    token_request = self._token_request(bearer, request.url, request.headers)
                    token_response = yield token_request
                    header = await self._store_token(key, token_request, token_response)
            request.headers["Authorization"] = header
            yield request
        elif any(c.scheme == "basic" for c in challenges):
            basic = self._basic_header()
            if basic is None or sent == basic:
                return  # nothing (new) to offer: the caller maps the 401
            self._basic = True
            request.headers["Authorization"] = basic
            yield request

    def _token_request(
        self, challenge: Challenge, url: httpx.URL, request_headers: httpx.Headers
    ) -> httpx.Request:
        realm = challenge.params.get("realm", "")
        try:
            realm_url = httpx.URL(realm)
        except httpx.InvalidURL:
            realm_url = httpx.URL("")
        if realm_url.scheme not in ("http", "https") or not realm_url.host:
            raise AuthError(
                f"registry {redact_url(url)} sent a Bearer challenge with bad realm "
                f"{clean_text(realm, 200)!r}"
            )
        params: list[tuple[str, str | int | float | bool | None]] = []
        if "service" in challenge.params:
            params.append(("service", challenge.params["service"]))
        # Several scopes come space-separated in the challenge, one `scope` param each here.
        params.extend(("scope", s) for s in challenge.params.get("scope", "").split())
        # identity: a token answer is small, and a compressed one could be a bomb.
        headers = {"Accept": "application/json", "Accept-Encoding": "identity"}
        if "user-agent" in request_headers:
            headers["User-Agent"] = request_headers["user-agent"]
        basic = self._basic_header()
        # Never hand credentials to a plain-HTTP realm of a TLS registry.
        if basic and (realm_url.scheme == "https" or url.scheme == "http"):
            headers["Authorization"] = basic
        return httpx.Request(
            "GET",
            realm_url.copy_merge_params(params),
            headers=headers,
            extensions={BODY_CAP: _MAX_TOKEN_RESPONSE},
        )

    async def _store_token(self, key: str, request: httpx.Request, response: httpx.Response) -> str:
        where = f"token endpoint {redact_url(request.url.copy_with(query=None))}"
        if response.status_code != 200:
            raise TokenEndpointError(
                f"{where} answered {response.status_code} {clean_text(response.reason_phrase, 100)}",
                response.status_code,
            )
        encoding = response.extensions.get(REFUSED_ENCODING)
        if encoding is not None:  # taken off by the response hook: never decoded
            raise AuthError(
                f"{where} sent Content-Encoding {clean_text(str(encoding), 60)!r} though asked "
                "for identity; not decoding it"
            )
        # aread(), not a capped iteration: httpx reads this response again after the flow
        # resumes, and a consumed stream without cached content would raise there. The
        # BODY_CAP extension of the request caps the body (HttpCore's response hook).
        length = response.headers.get("content-length", "")
        # isascii: isdigit() alone admits "²", on which int() raises ValueError.
        if length.isascii() and length.isdigit() and int(length) > _MAX_TOKEN_RESPONSE:
            raise AuthError(f"{where} sent an oversized response ({length} bytes)")
        try:
            body = await response.aread()
        except httpx.HTTPError as exc:
            raise AuthError(f"{where}: {type(exc).__name__}: {clean_text(str(exc))}") from exc
        if len(body) > _MAX_TOKEN_RESPONSE:
            raise AuthError(f"{where} sent an oversized response ({len(body)} bytes)")
        try:
            doc: Any = safejson.loads(body, where, what="token answer")
        except FormatError as exc:
            raise AuthError(f"{where} did not answer JSON: {exc}") from None
        token = (doc.get("token") or doc.get("access_token")) if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise AuthError(f"{where} answered without a token")
        ttl = doc.get("expires_in")
        if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or ttl <= 0:
            ttl = DEFAULT_TOKEN_TTL
        header = f"Bearer {token}"
        expires_at = time.monotonic() + max(float(ttl) - _EXPIRY_MARGIN, float(ttl) / 2)
        self._tokens[key] = _Token(header, expires_at)
        return header


class TokenEndpointError(AuthError):
    """The token endpoint answered an error status (429/5xx are worth a retry)."""

    def __init__(self, message: str, status: int) -> None:
        self.status = status
        super().__init__(message)


__all__ = [
    "BODY_CAP",
    "DEFAULT_TOKEN_TTL",
    "REFUSED_ENCODING",
    "Challenge",
    "Credentials",
    "RegistryAuth",
    "TokenEndpointError",
    "load_docker_credentials",
    "parse_www_authenticate",
]
