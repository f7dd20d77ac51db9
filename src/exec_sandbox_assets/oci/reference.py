"""Parse registry references and OCI layout references.

Registry references follow the distribution reference grammar, with a host always
required (no implicit docker.io):

    [docker://|oci://]HOST[:PORT]/REPOSITORY[:TAG][@DIGEST]
    https://HOST[:PORT]/REPOSITORY[:TAG][@DIGEST]
    http://HOST[:PORT]/REPOSITORY[:TAG][@DIGEST]

Without `http://` or `https://` the scheme is HTTPS, except on this machine's loopback
(`localhost`, 127.0.0.0/8, `[::1]`), which is plain HTTP, as docker (127.0.0.0/8 is an
insecure registry by default) and crane (`name.Registry.Scheme`) take it: a registry
there is almost always a test or a local mirror without a certificate, and loopback
traffic never leaves the host, so TLS would guard nothing against the network (every
byte is still checked against its signed digest). `https://localhost:5000/repo` asks
for TLS there.

Layout references (`parse_source_ref` only):

    oci:DIR[:TAG]            an OCI image layout directory
    oci-archive:FILE[:TAG]   a tar archive of one

Paths may contain colons, so the tag is the text after the LAST colon only when it
matches the tag grammar and the text before it is non-empty; otherwise the whole
rest is the path. A trailing empty tag is dropped, which is the escape for a path
whose last colon is followed by tag-like text: `oci:/data/a:b:` is the directory
`/data/a:b` with no tag, while `oci:/data/a:b` is `/data/a` with tag `b`. The
`oci:`/`oci-archive:` prefixes win over a registry host of that name; write
`docker://oci:5000/repo` for one.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from exec_sandbox_assets.base.errors import ConfigError
from exec_sandbox_assets.base.safetext import redact_url
from exec_sandbox_assets.oci.model import is_digest

# Grammar of github.com/distribution/reference (2.8).
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST_RE = re.compile(
    rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::([0-9]+))?$"
)
_PATH_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_MAX_REPOSITORY_LENGTH = 255
_SCHEMES = ("https", "http")


@dataclass(frozen=True)
class RegistryRef:
    """A repository on a registry, optionally pinned to a tag and/or digest."""

    scheme: str
    host: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}"

    @property
    def repo_url(self) -> str:
        return f"{self.base_url}/v2/{self.repository}"

    @property
    def reference(self) -> str | None:
        """What to fetch: the digest when pinned, else the tag."""
        return self.digest or self.tag

    @property
    def key(self) -> str:
        """A file-name-safe identifier of host + repository (not scheme, tag or digest).

        Readable prefix for humans, hash suffix because the slug alone can collide
        (`a/b_c` and `a_b/c`).
        """
        name = f"{self.host}/{self.repository}"
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")[:80]
        return f"{slug}-{hashlib.sha256(name.encode()).hexdigest()[:16]}"

    def with_tag(self, tag: str) -> RegistryRef:
        """The same repository at `tag` (any digest pin is dropped: it named other content)."""
        if not TAG_RE.fullmatch(tag):
            raise ConfigError(f"invalid tag {tag!r} for {self}")
        return replace(self, tag=tag, digest=None)

    def with_digest(self, digest: str) -> RegistryRef:
        if not is_digest(digest):
            raise ConfigError(f"invalid digest {digest!r} for {self}")
        return replace(self, digest=digest)

    def __str__(self) -> str:
        # Plain HTTP is always spelled out (it should be seen), HTTPS where the parser
        # would not assume it (loopback).
        plain, default = self.scheme == "http", default_scheme(self.host) == "https"
        prefix = f"{self.scheme}://" if plain or not default else ""
        tag = f":{self.tag}" if self.tag else ""
        digest = f"@{self.digest}" if self.digest else ""
        return f"{prefix}{self.host}/{self.repository}{tag}{digest}"


def is_loopback_host(host: str) -> bool:
    """`localhost`, an address of 127.0.0.0/8 or `[::1]`, with or without a port."""
    name = host.lower()
    name = name[1:].partition("]")[0] if name.startswith("[") else name.partition(":")[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def default_scheme(host: str) -> str:
    """The scheme of a reference written without one: plain HTTP on loopback (module doc)."""
    return "http" if is_loopback_host(host) else "https"


@dataclass(frozen=True)
class LayoutRef:
    """An OCI image layout directory (`oci`) or a tar archive of one (`oci-archive`)."""

    kind: Literal["oci", "oci-archive"]
    path: Path
    tag: str | None = None

    def __str__(self) -> str:
        text = f"{self.kind}:{self.path}"
        if self.tag:
            return f"{text}:{self.tag}"
        # Keep the round trip when the path itself ends in something tag-like.
        return f"{text}:" if _split_tag(str(self.path))[1] is not None else text


def parse_registry_ref(text: str) -> RegistryRef:
    """Parse `[scheme://]host[:port]/repository[:tag][@digest]`; default scheme https."""

    def bad(why: str) -> ConfigError:
        # Shown redacted: a mirror written as `https://user:token@host/repo` is refused
        # (credentials belong in docker's config.json), without echoing the token.
        return ConfigError(f"invalid registry reference {redact_url(text)!r}: {why}")

    rest = text.strip()
    scheme: str | None = None  # not written: decided by the host (module doc)
    if "://" in rest:
        given, _, rest = rest.partition("://")
        if given in _SCHEMES:
            scheme = given
        elif given not in ("docker", "oci"):
            # docker:// as skopeo writes it, oci:// as helm and oras do: a registry,
            # with the scheme left to the host, as without a prefix.
            raise bad(f"unsupported scheme {given!r} (use https://, http://, docker:// or oci://)")
    host, slash, remainder = rest.partition("/")
    if not slash or not remainder:
        raise bad("expected HOST/REPOSITORY (a registry host is required)")
    if "@" in host:
        raise bad("credentials do not belong in a reference (docker's config.json holds them)")
    if "." not in host and ":" not in host and host != "localhost":
        # Docker would read this as a Docker Hub namespace; we never guess a registry.
        raise bad(f"{host!r} is not a registry host (needs a dot, a port, or 'localhost')")
    match = _HOST_RE.fullmatch(host)
    if not match:
        raise bad(f"invalid registry host {host!r}")
    port = match.group(1)
    if port is not None and not 0 < int(port) < 65536:
        raise bad(f"invalid port {port}")

    name, at, digest = remainder.partition("@")
    if at and not is_digest(digest):
        raise bad(f"invalid digest {digest!r} (expected sha256:<64 hex> or sha512:<128 hex>)")
    tag: str | None = None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, _, tag = name.rpartition(":")
        if not TAG_RE.fullmatch(tag):
            raise bad(f"invalid tag {tag!r}")
    if len(name) > _MAX_REPOSITORY_LENGTH:
        raise bad(f"repository name longer than {_MAX_REPOSITORY_LENGTH} characters")
    for component in name.split("/"):
        if not _PATH_COMPONENT_RE.fullmatch(component):
            raise bad(
                f"invalid repository path component {component!r} "
                "(lowercase letters, digits, and single '.', '_', '__' or '-' runs between them)"
            )
    host = host.lower()
    return RegistryRef(scheme or default_scheme(host), host, name, tag, digest or None)


def _split_tag(text: str) -> tuple[str, str | None]:
    head, colon, tail = text.rpartition(":")
    if colon and head and TAG_RE.fullmatch(tail):
        return head, tail
    return text, None


def parse_source_ref(text: str) -> RegistryRef | LayoutRef:
    """A registry reference, or `oci:DIR[:TAG]` / `oci-archive:FILE[:TAG]` (see module doc)."""
    for kind in ("oci-archive", "oci"):
        prefix = f"{kind}:"
        if not text.startswith(prefix) or text.startswith(f"{prefix}//"):
            continue
        rest = text[len(prefix) :]
        if rest.endswith(":"):
            path, tag = rest[:-1], None
        else:
            path, tag = _split_tag(rest)
        if not path:
            raise ConfigError(f"invalid source {text!r}: missing path after {prefix!r}")
        layout_kind: Literal["oci", "oci-archive"] = "oci" if kind == "oci" else "oci-archive"
        return LayoutRef(layout_kind, Path(path).expanduser(), tag)
    return parse_registry_ref(text)


__all__ = [
    "TAG_RE",
    "LayoutRef",
    "RegistryRef",
    "default_scheme",
    "is_loopback_host",
    "parse_registry_ref",
    "parse_source_ref",
]
