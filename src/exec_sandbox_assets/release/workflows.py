"""Trusted release workflows and the Sigstore root: what keyless trust is configured
with, and what a cache record names (docs/keys.md).

Standard library only: the settings (`config.py`) and the warm path's cache trust
(`client.cache_trust`) use it, and neither may load the verifier. Verification itself is
`release/keyless.py`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from exec_sandbox_assets.base.errors import ConfigError

DEFAULT_TRUSTED_WORKFLOW = "https://github.com/dualeai/exec-sandbox/.github/workflows/release.yml"
# Sigstore's production root, as sigstore-python's TUF client last fetched it
# (scripts/refresh_sigstore_root.py refreshes it before each release; docs/keys.md).
VENDORED_ROOT = Path(__file__).resolve().parent / "sigstore_trusted_root.json"
_WORKFLOW = re.compile(
    r"https://github\.com/([A-Za-z0-9](?:[A-Za-z0-9-]{0,38}))/([A-Za-z0-9._-]{1,100})"
    r"/\.github/workflows/([A-Za-z0-9._-]{1,200}\.ya?ml)"
)


@dataclass(frozen=True)
class Workflow:
    """A trusted release workflow: `https://github.com/OWNER/REPO/.github/workflows/FILE`."""

    url: str

    @property
    def repository(self) -> str:
        return self.url.split("/.github/", 1)[0]

    @classmethod
    def parse(cls, text: str, what: str = "trusted workflow") -> Workflow:
        url = text.strip()
        if "@" in url:
            raise ConfigError(
                f"{what} {url!r} names a ref: give the workflow alone "
                "(releases are trusted at tags v<version> of it, never at a branch)"
            )
        if not _WORKFLOW.fullmatch(url):
            raise ConfigError(
                f"{what} {url!r} is not a GitHub workflow URL "
                "(https://github.com/OWNER/REPO/.github/workflows/FILE.yml)"
            )
        return cls(url)


def parse_workflows(
    text: str, what: str = "EXEC_SANDBOX_TRUSTED_WORKFLOWS"
) -> tuple[Workflow, ...]:
    """Comma-separated workflow URLs (empty: none, keyless trust disabled)."""
    parts = [p.strip() for p in text.replace("\n", ",").split(",") if p.strip()]
    return tuple(dict.fromkeys(Workflow.parse(p, what) for p in parts))


def root_path(configured: Path | None) -> Path:
    return configured if configured is not None else VENDORED_ROOT


def root_fingerprint(path: Path) -> str:
    """sha256 of the trusted root file: named in cache records with the workflow, so the
    warm path re-checks, without sigstore, that a file was admitted under this root."""
    try:
        return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise ConfigError(f"cannot read Sigstore trusted root {path}: {exc.strerror}") from None


def trust_id(workflow: Workflow, fingerprint: str) -> str:
    """What a cache record names for a release this workflow signed, under this root."""
    return f"sigstore:{workflow.url}#root={fingerprint.removeprefix('sha256:')[:16]}"


def trust_ids(workflows: Sequence[Workflow], root: Path | None) -> frozenset[str]:
    """The cache-trust ids the current settings accept (stdlib only: the warm path)."""
    if not workflows:
        return frozenset()
    try:
        fingerprint = root_fingerprint(root_path(root))
    except ConfigError:
        return frozenset()  # an unreadable root admits nothing; the cold path says why
    return frozenset(trust_id(w, fingerprint) for w in workflows)


__all__ = [
    "DEFAULT_TRUSTED_WORKFLOW",
    "VENDORED_ROOT",
    "Workflow",
    "parse_workflows",
    "root_fingerprint",
    "root_path",
    "trust_id",
    "trust_ids",
]
