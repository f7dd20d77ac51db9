"""What `exec_sandbox_assets.compat.get_assets()` returns, in place of 0.22.0's AsyncPooch.

`registry` (release file name -> digest of the verified release) and `fetch(name)` are
what 0.22.0's callers use; `client` is the native `AssetClient` for the settings as of
now (rebuilt when the environment changed, since 0.22.0 read it on every call).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from exec_sandbox_assets.base.errors import (
    AllSourcesFailedError,
    AssetError,
    AssetNotFoundError,
    ReleaseNotFoundError,
)
from exec_sandbox_assets.client import AssetClient
from exec_sandbox_assets.config import Settings
from exec_sandbox_assets.release import catalog

if TYPE_CHECKING:
    from exec_sandbox_assets.sources.legacy import LegacyRelease

logger = logging.getLogger("exec_sandbox_assets.compat")

LEGACY_HINT = (
    "If this release was published before signed OCI assets (exec-sandbox <= 0.22.0 on "
    "GitHub), set EXEC_SANDBOX_ALLOW_LEGACY_RELEASES=1 to accept it with 0.22.0's weaker "
    "trust (TLS and the GitHub API digest; see docs/compat.md)."
)


class CompatAssets:
    """What `get_assets()` returns: the client for the current environment (re-read on each
    use, as 0.22.0 read it) and `registry`, the verified release's files (name -> digest)."""

    def __init__(self, settings: Callable[[], Settings]) -> None:
        self._settings = settings
        self._client: AssetClient | None = None
        self._lock = threading.Lock()
        self._warned: set[Path] = set()
        self._legacy: LegacyRelease | None = None
        self.registry: dict[str, str] = {}

    @property
    def client(self) -> AssetClient:
        settings = self._settings()
        with self._lock:
            if self._client is None or self._client.settings != settings:
                self._client = AssetClient(settings)
                self.registry = {}
                self._legacy = None
            return self._client

    @property
    def settings(self) -> Settings:
        return self.client.settings

    async def load_registry(self) -> None:
        """Verify the release index and read this host OS's platform manifests; with
        EXEC_SANDBOX_ALLOW_LEGACY_RELEASES=1, a release without one is read from GitHub."""
        client = self.client
        try:
            await self._load_signed(client)
        except (ReleaseNotFoundError, AllSourcesFailedError) as exc:
            if not (exc.not_found and client.settings.allow_legacy_releases):
                raise _with_legacy_hint(exc) from exc
            from exec_sandbox_assets.sources import legacy as legacy_source

            logger.warning("no signed release found; using the legacy release (weaker trust)")
            self._legacy = await legacy_source.load_release(client.settings)
            self.registry.update({a.name: a.digest for a in self._legacy.assets.values()})

    async def _load_signed(self, client: AssetClient) -> None:
        from exec_sandbox_assets.sources import build_sources

        settings = client.settings
        sources = build_sources(settings)
        host = (settings.host_os, settings.host_goarch)
        others = [(settings.host_os, g) for g in catalog.GOARCH.values() if g != host[1]]
        try:
            for platform in [host, *others]:
                try:
                    part = await client.platform_release(sources, platform)
                except AssetError:
                    if platform == host:
                        raise
                    continue  # another CPU's files are optional (cross-arch prefetch)
                self.registry.update({t: layer.digest for t, layer in part.layers.items()})
        finally:
            await asyncio.gather(*(s.aclose() for s in sources), return_exceptions=True)

    async def fetch(self, fname: str, processor: object = None, progressbar: bool = True) -> Path:
        """The verified, decompressed file of release asset `fname` (AsyncPooch.fetch's
        signature; the processor is implied: the store decompresses after verifying)."""
        spec = catalog.spec_for_name(fname)
        if spec is None or spec.name != fname:
            raise AssetNotFoundError(f"File '{fname}' not in registry")
        client = self.client
        if self._legacy is not None and client.settings.allow_legacy_releases:
            from exec_sandbox_assets.sources import legacy as legacy_source

            return await legacy_source.fetch(client, self._legacy, spec)
        try:
            return (await client.fetch([spec], use_local=False))[spec.output_name]
        except (ReleaseNotFoundError, AllSourcesFailedError) as exc:
            raise _with_legacy_hint(exc) from exc

    async def load_registry_from_github(self, owner: str, repo: str, tag: str) -> None:
        """0.22.0's name for `load_registry` (the release is the one the settings name)."""
        await self.load_registry()

    def warn_unverified(self, directory: Path) -> None:
        if directory not in self._warned:
            self._warned.add(directory)
            logger.warning(
                "offline: using files exec-sandbox 0.22.0 left in %s without verifying them "
                "(go online once to have them checked against the signed release)",
                directory,
                extra={"dir": str(directory)},
            )


def _with_legacy_hint(exc: ReleaseNotFoundError | AllSourcesFailedError) -> AssetError:
    """No signed release anywhere: say how to accept exec-sandbox's older releases."""
    if not exc.not_found:
        return exc
    return type(exc)(f"{exc.what}. {LEGACY_HINT}", exc.attempts)


__all__ = ["LEGACY_HINT", "CompatAssets"]
