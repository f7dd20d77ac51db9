"""Which release the client uses: the asked tag, read from the first source that has
it, accepted by the policy against what was accepted before under that tag.

Rollback state is kept per tag across all sources (docs/format.md §5.2): after
`latest` = 2.0.0 was accepted from a mirror, an outage of that mirror cannot make
another source's older `latest` acceptable. The state lives in the cache's refs
(`trust-tag-latest.json`); the per-source files older clients wrote
(`trust-<source key>.json`) are still read, so an upgrade forgets nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from exec_sandbox_assets.base.errors import (
    AllSourcesFailedError,
    AssetNotFoundError,
    Attempt,
    ReleaseNotFoundError,
    TransportError,
)
from exec_sandbox_assets.cache.store import Store
from exec_sandbox_assets.config import Settings
from exec_sandbox_assets.release.policy import RollbackState, TrustPolicy, load_policy
from exec_sandbox_assets.sources.base import Source
from exec_sandbox_assets.sources.reader import PlatformRelease, ReleaseReader, VerifiedIndex

log = logging.getLogger(__name__)

TRUST_STATE_PREFIX = "trust-"
# Per tag, across sources: `trust-tag-latest` (older clients kept `trust-<source key>`).
TAG_STATE_PREFIX = TRUST_STATE_PREFIX + "tag-"


class ReleaseResolver:
    """Failover across sources for the release index, and the memo of what a client
    accepted (one client reads each release once)."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self._indexes: dict[str, VerifiedIndex] = {}
        self._platforms: dict[tuple[str, str, str], PlatformRelease] = {}

    def accepted(self, tag: str) -> VerifiedIndex | None:
        """The index this client accepted under `tag`, if any."""
        return self._indexes.get(tag)

    async def platform_release(
        self, sources: Sequence[Source], platform: tuple[str, str]
    ) -> PlatformRelease:
        """The accepted release for the asked tag and `platform`, from the first source
        that has it; `ReleaseNotFoundError` when every source said it has none."""
        tag = self.settings.tag
        cache_key = (tag, *platform)
        if (hit := self._platforms.get(cache_key)) is not None:
            return hit
        policy = None if self.settings.insecure_skip_verify else self._policy()
        attempts: list[Attempt] = []
        for source in sources:
            reader = ReleaseReader(source, policy)
            try:
                verified = await self._verified_index(reader, sources)
                part = await reader.platform(verified, platform)
            except TransportError as exc:
                log.warning(
                    "release %s: source %s failed, trying the next one: %s",
                    tag,
                    source.name,
                    exc,
                    extra={"source": source.name, "tag": tag, "error": str(exc)},
                )
                attempts.append(Attempt(source.name, str(exc), isinstance(exc, AssetNotFoundError)))
                continue
            self._platforms[cache_key] = part
            return part
        what = f"release {tag} for {'/'.join(platform)}"
        if attempts and all(a.not_found for a in attempts):
            raise ReleaseNotFoundError(what, attempts)
        raise AllSourcesFailedError(what, attempts)

    def _policy(self) -> TrustPolicy:
        s = self.settings
        return load_policy(
            s.trusted_keys, s.threshold, s.allow_downgrade, s.workflows, s.sigstore_root
        )

    async def _verified_index(
        self, reader: ReleaseReader, sources: Sequence[Source]
    ) -> VerifiedIndex:
        tag = self.settings.tag
        cached = self._indexes.get(tag)
        if cached is not None and cached.source == reader.source.name:
            return cached
        floating = self.settings.floating
        state = self.rollback_state(sources) if floating else None
        verified = await reader.read(tag, rollback=state)
        if state is not None and verified.created:
            accepted = RollbackState(
                verified.created, verified.version, verified.digest, reader.source.name
            )
            self.store.write_state(TAG_STATE_PREFIX + tag, state.after(accepted).to_json())
        self._indexes[tag] = verified
        return verified

    def rollback_state(self, sources: Sequence[Source] = ()) -> RollbackState:
        """What was accepted before under the asked tag, from any source: this tag's
        state, and the per-source files older versions wrote for `sources` (read, so an
        upgrade does not forget them)."""
        keys = [TAG_STATE_PREFIX + self.settings.tag]
        keys += [TRUST_STATE_PREFIX + s.key for s in sources]
        return RollbackState.newest(RollbackState.from_json(self.store.read_state(k)) for k in keys)
