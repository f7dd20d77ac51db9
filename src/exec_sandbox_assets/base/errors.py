"""Every error this package raises, as one tree.

    AssetError
    ├── ConfigError                 bad settings, unreadable key files, bad references
    │   └── UnknownArchError        an arch no release has (an AssetNotFoundError too)
    ├── FormatError                 malformed manifest/index/payload/annotation (names `where`)
    ├── TrustError                  never retried, never silently skipped to another source
    │   ├── AssetChecksumError      bytes do not match the digest they were referenced by
    │   ├── SignatureError          no (or too few) valid signatures by trusted keys
    │   │   └── NoTrustedKeysError  remote content, but no trusted key configured
    │   ├── VersionMismatchError    validly signed index of another release under the asked tag
    │   └── RollbackError           floating tag went back in time
    ├── TransportError              retried, then the next source is tried
    │   ├── AssetDownloadError      connection errors, 5xx/429 after retries, truncated bodies
    │   │   └── BlockedHostError    a request (or redirect) to a host the settings block
    │   ├── AuthError               401/403 after the auth round
    │   └── AssetNotFoundError      404: tag, manifest, blob or release file missing
    │       └── ReleaseNotFoundError  no source has the release (each answered "not found")
    ├── SizeLimitError              content exceeds its signed size or a hard cap (a TrustError too)
    ├── OutOfSpaceError             ENOSPC while writing; partial data is kept for resume
    ├── CacheError                  any other OS error on the cache directory (names the path)
    └── AllSourcesFailedError       every source failed; `.attempts` says each one and why

`AssetNotFoundError`, `AssetDownloadError` and `AssetChecksumError` keep the names
the original module exported. Offline-mode misses raise the builtin `FileNotFoundError`
(as the original did), via `AssetsNotFoundLocally`, which subclasses both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class AssetError(Exception):
    """Root of every error raised by exec_sandbox_assets."""


class ConfigError(AssetError):
    """Invalid settings, key files, or references given by the user."""


class FormatError(AssetError):
    """A document (manifest, index, payload, annotation) is malformed.

    `where` names the document: a URL, a path, or `index sha256:...`.
    """

    def __init__(self, message: str, where: str = "") -> None:
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class TrustError(AssetError):
    """Content failed verification. Never retried against the same source."""


class AssetChecksumError(TrustError):
    """Bytes do not hash to the digest they were referenced by."""

    def __init__(self, what: str, expected: str, actual: str, where: str = "") -> None:
        self.what, self.expected, self.actual, self.where = what, expected, actual, where
        src = f" from {where}" if where else ""
        super().__init__(f"digest mismatch for {what}{src}: expected {expected}, got {actual}")


class SignatureError(TrustError):
    """The index is not signed by enough trusted keys."""


class NoTrustedKeysError(SignatureError):
    """Remote content was requested but no trusted public key is configured."""


class VersionMismatchError(TrustError):
    """A validly signed index of another release was served under the asked tag."""


class RollbackError(TrustError):
    """A floating tag now points at a release older than one accepted before."""


class SizeLimitError(TrustError):
    """Content is larger than its signed size or a hard cap."""


class TransportError(AssetError):
    """Fetching failed (network, HTTP status, missing file). Retried, then next source."""


class AssetDownloadError(TransportError):
    """Connection failure, 5xx/429 after retries, or a truncated body."""


class BlockedHostError(AssetDownloadError):
    """A request, or a redirect or token realm it led to, named a blocked host (the air
    gap); refused before any name lookup or connection. The next source is tried."""


class AuthError(TransportError):
    """The registry refused our credentials (or their absence)."""


class AssetNotFoundError(TransportError):
    """The source does not have the tag, manifest, blob or file."""


class UnknownArchError(ConfigError, AssetNotFoundError):
    """An arch no release has files for (`arm64`: Go's name, the kernel's is `aarch64`).
    A usage error, and a not-found one too: exec-sandbox 0.22.0 raised AssetNotFoundError
    for it (it found no such file), and callers catch that."""


class OutOfSpaceError(AssetError):
    """The disk filled up while writing; partial data was kept for a later resume."""


class CacheError(AssetError):
    """The cache directory cannot be used (read-only, not a directory, ...); names the path."""


@dataclass(frozen=True)
class Attempt:
    """One source that was tried and why it failed."""

    source: str
    error: str
    not_found: bool = False  # the source answered that it does not have it (404, no tag)


def _tried(attempts: Sequence[Attempt]) -> str:
    return "\n".join(f"  - {a.source}: {a.error}" for a in attempts)


class ReleaseNotFoundError(AssetNotFoundError):
    """Every source answered that it does not have the release; `attempts` says each."""

    def __init__(self, what: str, attempts: Sequence[Attempt]) -> None:
        self.what = what
        self.attempts = tuple(attempts)
        super().__init__(f"{what} not found on any source; tried:\n{_tried(self.attempts)}")

    not_found = True


class AllSourcesFailedError(AssetDownloadError):
    """Every configured source failed; `attempts` lists each with its reason."""

    def __init__(self, what: str, attempts: Sequence[Attempt]) -> None:
        self.what = what
        self.attempts = tuple(attempts)
        super().__init__(f"could not fetch {what}; tried:\n{_tried(self.attempts)}")

    @property
    def not_found(self) -> bool:
        """True when every source said it does not have it (rather than failing)."""
        return bool(self.attempts) and all(a.not_found for a in self.attempts)


class AssetsNotFoundLocally(FileNotFoundError, AssetError):
    """Offline (or download disabled) and the asset is in none of the searched places."""

    def __init__(self, what: str, searched: Sequence[str], hint: str = "") -> None:
        self.what = what
        self.searched = tuple(searched)
        places = "\n".join(f"  - {p}" for p in self.searched)
        tail = f"\n{hint}" if hint else ""
        super().__init__(f"{what} not found; searched:\n{places}{tail}")


__all__ = [
    "AllSourcesFailedError",
    "AssetChecksumError",
    "AssetDownloadError",
    "AssetError",
    "AssetNotFoundError",
    "AssetsNotFoundLocally",
    "Attempt",
    "AuthError",
    "BlockedHostError",
    "CacheError",
    "ConfigError",
    "FormatError",
    "NoTrustedKeysError",
    "OutOfSpaceError",
    "ReleaseNotFoundError",
    "RollbackError",
    "SignatureError",
    "SizeLimitError",
    "TransportError",
    "TrustError",
    "UnknownArchError",
    "VersionMismatchError",
]
