"""Making untrusted text and secret-bearing URLs safe to show.

Two rules for everything that ends up in an error message or a log line:

- `clean_text`: text a server chose (a registry's error message, a reason phrase, a
  header value, an annotation) is printed with its control characters escaped, so it
  cannot move the cursor, recolour or clear a terminal, forge extra lines of a
  multi-line error (it is always one line: every break `str.splitlines` knows is
  escaped), or reorder what follows it (bidi overrides); and it is cut to a sane length.
- `redact_url`: a URL is shown without the user:password of its userinfo and without
  the values of query parameters that carry credentials (tokens, signed-URL
  signatures), so `EXEC_SANDBOX_RELEASES_URL=https://user:token@host/...` or a signed
  CDN redirect never reaches a terminal or a log file.

Pure functions of the standard library: the scheduler's warm path may import this.
"""

from __future__ import annotations

import re
import urllib.parse

# C0 and C1 controls (newline and tab included: they forge lines), DEL, zero-width and
# bidi formatting characters, line/paragraph separators, BOM, and lone surrogates
# (which a JSON `\ud800` escape produces and which no terminal encoding can print).
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff]"
)
# Query parameters whose value is a credential or a signature (compared lowercased).
_SECRET_PARAMS = frozenset(
    {
        "access_token",
        "auth",
        "code",
        "id_token",
        "jwt",
        "key",
        "password",
        "refresh_token",
        "secret",
        "sig",
        "signature",
        "token",
    }
)
# Whole families: AWS SigV4 (`X-Amz-Signature`, `X-Amz-Credential`,
# `X-Amz-Security-Token`), GCS (`X-Goog-*`), Azure SAS (`sv`, `se`, `sig`: sig above).
_SECRET_PREFIXES = ("x-amz-", "x-goog-")
REDACTED = "***"
DEFAULT_LIMIT = 300


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clean_text(text: str, limit: int = DEFAULT_LIMIT) -> str:
    """`text` with every control/formatting character shown as an escape, cut to `limit`."""
    cut = len(text) > limit
    cleaned = _UNSAFE.sub(_escape, text[:limit])
    if len(cleaned) > limit:  # escapes lengthen it
        cleaned, cut = cleaned[:limit], True
    return f"{cleaned}..." if cut else cleaned


def _secret(name: str) -> bool:
    key = urllib.parse.unquote_plus(name).strip().lower()
    return key in _SECRET_PARAMS or key.startswith(_SECRET_PREFIXES)


def _redact_query(query: str) -> str:
    parts = []
    for piece in query.split("&"):
        name, eq, _value = piece.partition("=")
        parts.append(f"{name}={REDACTED}" if eq and _secret(name) else piece)
    return "&".join(parts)


def redact_url(url: object) -> str:
    """`url` (a str or anything whose str() is a URL, e.g. httpx.URL) for display:
    userinfo replaced by `***`, credential query values by `***`, controls escaped."""
    text = str(url)
    if "://" not in text:
        # A reference without a scheme (`user:pw@host/repo@sha256:...`): userinfo is
        # whatever precedes an `@` before the first `/`.
        head, slash, rest = text.partition("/")
        if "@" in head:
            text = f"{REDACTED}@{head.rpartition('@')[2]}{slash}{rest}"
        return clean_text(text, 2048)
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError:  # a malformed bracketed host, say: still hide anything userinfo-like
        return clean_text(re.sub(r"//[^/?#]*@", f"//{REDACTED}@", text), 2048)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rpartition('@')[2]}"
    query = _redact_query(parts.query) if parts.query else ""
    shown = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    # urlunsplit drops an empty "?" or "#"; nothing secret is lost by that.
    return clean_text(shown, 2048)


__all__ = ["clean_text", "redact_url"]
