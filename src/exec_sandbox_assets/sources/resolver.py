"""Which release the client uses: the asked tag, read from the first source that has
it, accepted by the policy against what was accepted before under that tag.

Rollback state is kept per tag across all sources (docs/format.md §5.2): after
`latest` = 2.0.0 was accepted from a mirror, an outage of that mirror cannot make
another source's older `latest` acceptable. The state lives in the cache's refs
(`trust-tag-latest.json`); the per-source files older clients wrote
(`trust-<source key>.json`) are still read, so an upgrade forgets nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence

from exec_sandbox_assets.base.errors import TransportError
from exec_sandbox_assets.cache.store import Store
from exec_sandbox_assets.config import Settings
from exec_sandbox_assets.release.policy import RollbackState, TrustPolicy, load_policy
from exec_sandbox_assets.sources.base import Source
from exec_sandbox_assets.sources.failover import Failover
from exec_sandbox_assets.sources.reader import (
    PendingPlatform,
    PlatformRelease,
    ReleaseReader,
    VerifiedIndex,
)

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
        return await (await self.pending_platform(sources, platform)).verified

    async def pending_platform(
        self, sources: Sequence[Source], platform: tuple[str, str]
    ) -> PendingPlatform:
        """The asked tag's manifest for `platform` from the first source that has it,
        read while its signature is checked (`PendingPlatform.verified`: the verdict).
        Once this client accepted the tag's index, the manifest comes verified."""
        tag = self.settings.tag
        cache_key = (tag, *platform)
        if (hit := self._platforms.get(cache_key)) is not None:
            return _settled(hit)
        # The keys are parsed (and the crypto stack imported) while the index is on its
        # way: off the critical path of a cold pull.
        loading = (
            None
            if self.settings.insecure_skip_verify
            else asyncio.ensure_future(asyncio.to_thread(self._policy))
        )
        try:
            return await self._first_source(sources, platform, loading)
        finally:
            if loading is not None and not loading.done():
                loading.cancel()
            elif loading is not None and not loading.cancelled():
                loading.exception()  # retrieved: raised to a reader already, if any

    async def _first_source(
        self,
        sources: Sequence[Source],
        platform: tuple[str, str],
        loading: asyncio.Future[TrustPolicy] | None,
    ) -> PendingPlatform:
        tag = self.settings.tag
        failover = Failover(f"release {tag} for {'/'.join(platform)}")
        for source in sources:
            reader = ReleaseReader(source, None)  # its policy: `loading`, once loaded
            try:
                cached = self._indexes.get(tag)
                if cached is not None and cached.source == source.name:
                    return _settled(await reader.platform(cached, platform))
                pending = await self._read_platform(reader, sources, platform, loading)
            except TransportError as exc:
                failover.failed(source.name, exc)
                continue
            failover.succeeded(source.name)
            return pending
        raise failover.error()

    def _policy(self) -> TrustPolicy:
        s = self.settings
        return load_policy(
            s.trusted_keys, s.threshold, s.allow_downgrade, s.workflows, s.sigstore_root
        )

    async def _read_platform(
        self,
        reader: ReleaseReader,
        sources: Sequence[Source],
        platform: tuple[str, str],
        loading: asyncio.Future[TrustPolicy] | None,
    ) -> PendingPlatform:
        tag = self.settings.tag
        state = self.rollback_state(sources) if self.settings.floating else None
        pending = await reader.read_platform(
            tag, platform, rollback=state, fallbacks=sources, policy=loading
        )

        async def accepted() -> PlatformRelease:
            part = await pending.verified
            verified = part.release
            if state is not None and verified.created:
                now = RollbackState(
                    verified.created, verified.version, verified.digest, reader.source.name
                )
                self.store.write_state(TAG_STATE_PREFIX + tag, state.after(now).to_json())
            self._indexes[tag] = verified
            self._platforms[(tag, *platform)] = part
            return part

        return dataclasses.replace(pending, verified=asyncio.ensure_future(accepted()))

    def rollback_state(self, sources: Sequence[Source] = ()) -> RollbackState:
        """What was accepted before under the asked tag, from any source: this tag's
        state, and the per-source files older versions wrote for `sources` (read, so an
        upgrade does not forget them)."""
        keys = [TAG_STATE_PREFIX + self.settings.tag]
        keys += [TRUST_STATE_PREFIX + s.key for s in sources]
        return RollbackState.newest(RollbackState.from_json(self.store.read_state(k)) for k in keys)


def _settled(part: PlatformRelease) -> PendingPlatform:
    """An accepted manifest as a pending one whose verdict is already in."""
    verdict: asyncio.Future[PlatformRelease] = asyncio.get_running_loop().create_future()
    verdict.set_result(part)
    return PendingPlatform(
        part.release.source, part.release.version, part.platform, part.manifest_digest,
        part.layers, verdict,
    )  # fmt: skip
