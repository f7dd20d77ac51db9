"""Release versions and their tags (docs/format.md §2): one rule, used by the client's
settings, the publisher, the mirror and the policy.

A version is what a release is called (`0.22.0`); its tag is `v` + version. A version
must make a valid OCI tag (`oci.reference.TAG_RE`, at most 128 characters with the `v`)
and a safe single path component (the cache keeps a release under `v<version>/`).
`latest` is the one floating tag; it is not a version. Pure; imports nothing heavy
(config.py, on the scheduler's warm path, uses it).
"""

from __future__ import annotations

from dataclasses import dataclass

from exec_sandbox_assets.base.errors import ConfigError
from exec_sandbox_assets.oci.reference import TAG_RE

LATEST = "latest"
TAG_PREFIX = "v"
_RULE = "letters, digits, '.', '_' and '-' only (it becomes the tag v<version>)"


@dataclass(frozen=True)
class Version:
    """A release version, without the tag's leading `v` (`Version.parse("v1.2") == "1.2"`)."""

    text: str

    @classmethod
    def parse(cls, text: str, what: str = "version") -> Version:
        """`1.2.3` or `v1.2.3` (a `v` before a digit is the tag's, dropped); `ConfigError`
        naming `what` for anything no tag can hold."""
        raw = text.strip()
        version = raw[1:] if len(raw) > 1 and raw[0] in "vV" and raw[1].isdigit() else raw
        if version == LATEST:
            raise ConfigError(f"invalid {what} {text!r}: 'latest' is a floating tag, not a version")
        if not is_valid(version):
            raise ConfigError(f"invalid {what} {text!r}: {_RULE}")
        return cls(version)

    @property
    def tag(self) -> str:
        return TAG_PREFIX + self.text

    def __str__(self) -> str:
        return self.text


def is_valid(version: str) -> bool:
    """Whether `version` (without `v`) makes a valid tag and a safe path component
    (starting with a letter or digit, as the cache's version directories do)."""
    return (
        bool(TAG_RE.fullmatch(TAG_PREFIX + version))
        and version[:1].isascii()
        and version[:1].isalnum()
        and ".." not in version
    )


def normalize_version(text: str, what: str = "asset version") -> str:
    """The settings' rule: empty or `latest` -> `latest`; `v1.2.3` and `1.2.3` -> `1.2.3`."""
    if text.strip() in ("", LATEST):
        return LATEST
    return Version.parse(text, what).text


def tag_for(version: str) -> str:
    """The tag a client asks for: `latest`, or `v<version>`."""
    return LATEST if version == LATEST else TAG_PREFIX + version.removeprefix(TAG_PREFIX)


def version_of_tag(tag: str) -> str | None:
    """The version a tag binds (`v1.2.3` -> `1.2.3`); None for `latest`, digests and tags
    that are not `v<version>` (they bind nothing)."""
    if len(tag) > 1 and tag[0] == TAG_PREFIX and tag[1].isdigit() and is_valid(tag[1:]):
        return tag[1:]
    return None


def same_version(a: str, b: str) -> bool:
    """Versions compare without the tag's `v` (`v1.2` is `1.2`)."""
    return a.removeprefix(TAG_PREFIX) == b.removeprefix(TAG_PREFIX)


__all__ = [
    "LATEST",
    "TAG_PREFIX",
    "Version",
    "is_valid",
    "normalize_version",
    "same_version",
    "tag_for",
    "version_of_tag",
]
