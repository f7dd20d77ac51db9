"""Resolution order (docs/format.md §7) and the verified, parallel fetch.

1. explicit override dir, 2. EXEC_SANDBOX_IMAGES_DIR, 3. local build dir: trusted as is;
4. the cache (a stat against the record written when the file was verified);
5. sources in order: mirrors (registries and `oci:` layouts), then the default repository;
6. GitHub Releases.

The warm path (steps 1-4) imports nothing of the network or crypto stack and hashes
nothing. The cold path verifies the index signature, every manifest by digest, every
blob by digest (or its signed chunk digests), then the decompressed content, before a
file appears under its final name. The blobs start downloading as soon as the platform
manifest is read, while the signature is still on its way; nothing of them is read for
install before it verified (`cache.gate`). Trust errors stop the fetch; transport errors
move on to the next source.

Orchestration only: which release is accepted is decided by `release.policy.accept_index`,
reached through the one `sources.reader.ReleaseReader`; sources come from a factory
(`AssetClient(settings, sources=...)`), so tests can run the client on sources in memory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from exec_sandbox_assets.base.errors import (
    AllSourcesFailedError,
    AssetError,
    AssetNotFoundError,
    AssetsNotFoundLocally,
    TransportError,
)
from exec_sandbox_assets.cache import delta, legacy, space
from exec_sandbox_assets.cache.content import ContentState
from exec_sandbox_assets.cache.download import MAX_RESUMES
from exec_sandbox_assets.cache.gate import Gate
from exec_sandbox_assets.cache.refs import FLOATING_REF_PREFIX
from exec_sandbox_assets.cache.store import CacheTrust, OutputSpec, Store
from exec_sandbox_assets.config import LATEST, Settings
from exec_sandbox_assets.release import catalog
from exec_sandbox_assets.release.catalog import AssetSpec, Kind
from exec_sandbox_assets.release.keyid import key_ids_of_files
from exec_sandbox_assets.release.workflows import trust_ids

if TYPE_CHECKING:  # the cold path: imported when a fetch needs it (scheduler boot stays lean)
    from exec_sandbox_assets.release.documents import AssetLayer
    from exec_sandbox_assets.sources import Source
    from exec_sandbox_assets.sources.reader import PendingPlatform, PlatformRelease, VerifiedIndex
    from exec_sandbox_assets.sources.resolver import ReleaseResolver

log = logging.getLogger(__name__)

#: settings -> the ordered sources to try (default: `sources.build_sources`)
SourcesFactory = Callable[[Settings], "Sequence[Source]"]


class Progress(Protocol):
    """What the CLI shows; the library passes None."""

    def start(self, name: str, total: int) -> None: ...

    def advance(self, name: str, nbytes: int) -> None: ...

    def finish(self, name: str) -> None: ...


class AssetClient:
    """Finds, fetches and verifies assets. Built from `Settings`; holds no event-loop state,
    so one client serves calls from any loop (the scheduler may run several)."""

    def __init__(self, settings: Settings, *, sources: SourcesFactory | None = None) -> None:
        self.settings = settings
        self.store = Store(
            settings.cache_dir,
            lock_timeout=settings.lock_timeout,
            trust=cache_trust(settings),
            content_check_after=settings.verify_content_after,
        )
        self.sources: SourcesFactory = sources or _default_sources
        # Output name -> how the last fetch got it and what that cost (`pull`'s summary).
        self.obtained: dict[str, delta.Obtained] = {}

    @functools.cached_property
    def releases(self) -> ReleaseResolver:
        """Which release is used: failover, the policy, rollback state (the cold path)."""
        from exec_sandbox_assets.sources.resolver import ReleaseResolver

        return ReleaseResolver(self.settings, self.store)

    def verified_index(self, tag: str) -> VerifiedIndex | None:
        """The index this client verified for `tag` (after a fetch), else None."""
        return self.releases.accepted(tag)

    # -- steps 1-4: no network, no hashing ---------------------------------------------

    def search_dirs(self, override: Path | None = None) -> list[Path]:
        dirs = [override, self.settings.images_dir, self.settings.local_build_dir]
        return [d for d in dirs if d is not None]

    def find_local(self, output_name: str, override: Path | None = None) -> Path | None:
        """An operator-provided file (steps 1-3); trusted as it is (docs/format.md §7)."""
        for directory in self.search_dirs(override):
            path = directory / output_name
            if path.is_file():
                return path
        return None

    def cached_version(self) -> str | None:
        """The version the cache holds for the asked tag (a floating tag maps through refs)."""
        if not self.settings.floating:
            return self.settings.version
        state = self.store.read_state(FLOATING_REF_PREFIX + LATEST)
        version = state.get("version") if state else None
        return version if isinstance(version, str) else None

    def find_cached(self, output_name: str) -> Path | None:
        version = self.cached_version()
        return self.store.lookup(version, output_name) if version else None

    def check_cached_content(self, specs: Sequence[AssetSpec]) -> dict[str, ContentState]:
        """Hash the cached file of each of `specs` that has a record (`pull --force`): one
        that does not match its digest loses its record, so a fetch that follows downloads
        it again; one whose bytes match but whose stat changed gets its stat recorded."""
        version = self.cached_version()
        if version is None:
            return {}
        return {
            s.output_name: self.store.check_content(version, s.output_name, restat=True)
            for s in specs
            if self.store.read_record(version, s.output_name) is not None
        }

    def find(self, output_name: str, override: Path | None = None) -> Path | None:
        return self.find_local(output_name, override) or self.find_cached(output_name)

    def searched_places(self, override: Path | None = None) -> list[str]:
        places = [str(d) for d in self.search_dirs(override)]
        version = self.cached_version()
        places.append(
            str(self.store.version_dir(version))
            if version
            else f"{self.settings.cache_dir} (no cached release for tag {self.settings.tag})"
        )
        return places

    # -- steps 5-6 ----------------------------------------------------------------------

    def complete_dir(self, specs: Sequence[AssetSpec], override: Path | None = None) -> Path | None:
        """The first place (steps 1-4) that holds every one of `specs`, if any.

        The scheduler is handed one directory, so a mix of places will not do.
        """
        version = self.cached_version()
        for directory in self.search_dirs(override):
            if all((directory / s.output_name).is_file() for s in specs):
                return directory
        if version and all(self.store.lookup(version, s.output_name) for s in specs):
            return self.store.version_dir(version)
        return None

    async def fetch(
        self,
        specs: Sequence[AssetSpec],
        *,
        override: Path | None = None,
        use_local: bool = True,
        progress: Progress | None = None,
    ) -> dict[str, Path]:
        """Output name -> path for every spec, fetching what no local place has.

        Raises the first failure after every other asset of the call has finished (so
        their downloads are complete or resumable). `use_local=False` skips steps 1-3.
        """
        results = await self.fetch_each(
            specs, override=override, use_local=use_local, progress=progress
        )
        for value in results.values():
            if isinstance(value, BaseException):
                raise value
        return {name: path for name, path in results.items() if isinstance(path, Path)}

    async def fetch_each(
        self,
        specs: Sequence[AssetSpec],
        *,
        override: Path | None = None,
        use_local: bool = True,
        progress: Progress | None = None,
    ) -> dict[str, Path | BaseException]:
        """Like `fetch`, but one result or exception per output name."""
        results: dict[str, Path | BaseException] = {}
        for spec in specs:
            name = spec.output_name
            path = self.find(name, override) if use_local else self.find_cached(name)
            if path is not None:
                results[name] = path
        missing = [s for s in specs if s.output_name not in results]
        if not missing:
            return results
        local = any(m.startswith(("oci:", "oci-archive:")) for m in self.settings.mirrors)
        if self.settings.offline and not local:
            names = ", ".join(s.output_name for s in missing)
            error = AssetsNotFoundLocally(
                names, self.searched_places(override), "offline mode (EXEC_SANDBOX_OFFLINE=1)"
            )
            return results | {s.output_name: error for s in missing}
        results.update(await self._fetch_remote(missing, progress))
        return results

    async def _fetch_remote(
        self, specs: Sequence[AssetSpec], progress: Progress | None
    ) -> dict[str, Path | BaseException]:
        sources = list(self.sources(self.settings))
        parts: list[tuple[PendingPlatform, Gate, list[AssetSpec]]] = []
        try:
            if not sources:
                raise AssetsNotFoundLocally(
                    ", ".join(s.output_name for s in specs),
                    self.searched_places(),
                    "no source is configured (offline or air-gapped, and no mirror)",
                )
            for platform, group in _by_platform(specs, self.settings.host_os).items():
                part = await self.releases.pending_platform(sources, platform)
                parts.append((part, _gate_of(part), group))
            jobs = [(part, gate, spec) for part, gate, group in parts for spec in group]
            # Largest first: the longest install (a base image) starts at once, not after
            # the kernels; the small ones fill in around it.
            jobs.sort(key=lambda job: -_layer_size(job[0], job[2]))
            # Before the first byte: what does not fit is refused, smallest files first in.
            room = space.plan_downloads(
                self.store,
                [
                    (spec.output_name, layer)
                    for part, _, spec in jobs
                    if (layer := part.layers.get(spec.name)) is not None
                ],
                self.settings.min_free,
            )
            refused = set(room.refused) if room else set()
            jobs = [job for job in jobs if job[-1].output_name not in refused]
            limit = asyncio.Semaphore(self.settings.concurrency)
            # One patch decoded at a time: each holds a window as large as its file and
            # maps its reference, so the peak is the largest file's, not their sum.
            rebuild = asyncio.Lock()
            outcomes = await asyncio.gather(
                *(
                    self._fetch_one(sources, part, gate, spec, limit, progress, rebuild)
                    for part, gate, spec in jobs
                ),
                return_exceptions=True,
            )
        except AssetError as exc:
            return {s.output_name: exc for s in specs}
        finally:
            verdicts = [part.verified for part, _, _ in parts]
            for verdict in verdicts:
                verdict.cancel()  # a no-op once it is in
            await asyncio.gather(*verdicts, return_exceptions=True)
            await asyncio.gather(*(s.aclose() for s in sources), return_exceptions=True)
        results: dict[str, Path | BaseException] = {}
        for (_, _, spec), outcome in zip(jobs, outcomes, strict=True):
            if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                raise outcome  # cancellation, KeyboardInterrupt: not a per-asset failure
            results[spec.output_name] = outcome
        if room is not None:
            results.update({name: room.error(name) for name in room.refused})
        accepted = self.releases.accepted(LATEST) if self.settings.floating else None
        if accepted is not None and any(isinstance(v, Path) for v in results.values()):
            # The cache's `latest` moves to the release just fetched, never before.
            ref = {"version": accepted.version, "digest": accepted.digest}
            self.store.write_state(FLOATING_REF_PREFIX + LATEST, ref)
        return results

    async def _fetch_one(
        self,
        sources: Sequence[Source],
        part: PendingPlatform,
        gate: Gate,
        spec: AssetSpec,
        limit: asyncio.Semaphore,
        progress: Progress | None,
        rebuild: asyncio.Lock,
    ) -> Path:
        layer = part.layers.get(spec.name)
        if layer is None:
            await part.verified  # a refused release is reported as such, not as incomplete
            raise AssetNotFoundError(
                f"release {part.version} ({part.source}) has no {spec.name} "
                f"for {'/'.join(part.platform)}; it has: {', '.join(sorted(part.layers))}"
            )
        out = OutputSpec(
            version=part.version,
            name=layer.output_name,
            layer_digest=layer.digest,
            layer_size=layer.size,
            compressed=layer.compressed,
            content_digest=layer.content_digest,
            content_size=layer.content_size,
            executable=layer.kind is Kind.GVPROXY,
            source=part.source,
            chunks=layer.chunks,
        )
        bar = None if progress is None else _BlobProgress(progress, layer.output_name, layer.size)
        async with limit:
            # A file exec-sandbox <= 0.22.0 left is hashed against the signed digest and
            # adopted on a match: no download (cache/legacy.py). Adopting installs, so
            # only once the release verified.
            if legacy.has_candidate(self.store, out, self.settings.legacy_dirs):
                release = (await part.verified).release
                verified = dataclasses.replace(out, verified_by=release.signers)
                adopted = await legacy.adopt(self.store, verified, self.settings.legacy_dirs)
                if adopted is not None:
                    self.obtained[out.name] = delta.Obtained(delta.REUSE, 0, layer.size)
                    return adopted
            # Only what changed since a release the cache holds (docs/format.md §9).
            upgraded = await self._by_delta(sources, part, out, layer, bar, rebuild)
            if upgraded is not None:
                if progress is not None:
                    progress.finish(layer.output_name)
                return upgraded
            # Blobs are content-addressed: any source may serve one, starting with the one
            # whose index we verified; a partial download resumes across sources.
            from exec_sandbox_assets.sources.failover import Failover  # the network path only

            failover = Failover(spec.name)
            for source in _prefer(sources, part.source):
                try:
                    path = await self._ensure_resuming(out, source, layer, bar, gate)
                    await part.verified  # a cached file is served once the release verified
                except TransportError as exc:
                    failover.failed(source.name, exc)
                    continue
                failover.succeeded(source.name)
                if progress is not None:
                    progress.finish(layer.output_name)
                self.obtained[out.name] = delta.Obtained(delta.DOWNLOAD, layer.size, layer.size)
                return path
        raise AllSourcesFailedError(spec.name, failover.attempts)

    async def _by_delta(
        self,
        sources: Sequence[Source],
        part: PendingPlatform,
        out: OutputSpec,
        layer: AssetLayer,
        bar: _BlobProgress | None,
        rebuild: asyncio.Lock,
    ) -> Path | None:
        """The output from content the cache holds (same digest, or a patch's base), else
        None: the caller downloads the layer (each failure here was logged once)."""
        held = delta.held(self.store, out.content_digest, skip_version=out.version)
        if not layer.patches and held is None:
            return None
        # Reusing installs and a patch is decoded: only once the release verified.
        release = (await part.verified).release
        out = dataclasses.replace(out, verified_by=release.signers)
        if held is not None and (reused := await delta.reuse(self.store, out, held)) is not None:
            self.obtained[out.name] = delta.Obtained(delta.REUSE, 0, layer.size)
            return reused
        if not layer.patches:
            return None
        source = next(iter(_prefer(sources, part.source)))
        if not source.serves_patches:  # a GitHub Release folder: layers only
            return None
        rebuilt = await delta.patch(
            self.store,
            out,
            layer.patches,
            source.patch_opener,
            bar.attempt() if bar else None,
            rebuild,
        )
        if rebuilt is None:
            return None
        path, used = rebuilt
        self.obtained[out.name] = (
            delta.Obtained(delta.PATCH, used.size, layer.size)
            if used is not None
            else delta.Obtained("cached", 0, layer.size)
        )
        return path

    async def _ensure_resuming(
        self,
        out: OutputSpec,
        source: Source,
        layer: AssetLayer,
        bar: _BlobProgress | None,
        gate: Gate,
    ) -> Path:
        """`store.ensure` from one source; the store resumes a body that broke off."""
        progress = bar.attempt() if bar else None
        opener = source.opener(layer)
        return await self.store.ensure(out, opener, progress, resumes=MAX_RESUMES, gate=gate)

    async def platform_release(
        self, sources: Sequence[Source], platform: tuple[str, str]
    ) -> PlatformRelease:
        """The accepted release for the asked tag and `platform`, from the first source
        that has it (see `sources.resolver`)."""
        return await self.releases.platform_release(sources, platform)


def _default_sources(settings: Settings) -> Sequence[Source]:
    from exec_sandbox_assets.sources import build_sources

    return build_sources(settings)


def cache_trust(settings: Settings) -> CacheTrust:
    """Which cache records the warm path may serve under these settings: key ids from
    the PEM files and the trusted workflows under the Sigstore root's fingerprint, with
    the stdlib only (no crypto or sigstore import on the boot path)."""
    return CacheTrust(
        key_ids=key_ids_of_files(settings.trusted_keys)
        | trust_ids(settings.workflows, settings.sigstore_root),
        threshold=settings.threshold,
        insecure=settings.insecure_skip_verify,
        legacy=settings.allow_legacy_releases,
    )


def platform_for(spec: AssetSpec, host_os: str) -> tuple[str, str]:
    """Which platform manifest carries `spec`: the host's os with the asset's CPU."""
    if spec.kind is Kind.GVPROXY:
        os_, _, goarch = spec.arch.partition("-")
        return os_, goarch
    return host_os, catalog.GOARCH[spec.arch]


def _by_platform(
    specs: Sequence[AssetSpec], host_os: str
) -> dict[tuple[str, str], list[AssetSpec]]:
    groups: dict[tuple[str, str], list[AssetSpec]] = {}
    for spec in specs:
        groups.setdefault(platform_for(spec, host_os), []).append(spec)
    return groups


def _gate_of(part: PendingPlatform) -> Gate:
    """The gate the installs of `part`'s layers wait on: open once its verdict is in."""
    gate = Gate()

    def settle(verdict: asyncio.Future[PlatformRelease]) -> None:
        if verdict.cancelled():
            gate.fail(asyncio.CancelledError())
        elif (error := verdict.exception()) is not None:
            gate.fail(error)
        else:
            gate.open(verdict.result().release.signers)

    part.verified.add_done_callback(settle)
    return gate


def _layer_size(part: PendingPlatform, spec: AssetSpec) -> int:
    layer = part.layers.get(spec.name)
    return 0 if layer is None else layer.content_size


def _prefer(sources: Sequence[Source], first: str) -> Iterable[Source]:
    yield from (s for s in sources if s.name == first)
    yield from (s for s in sources if s.name != first)


class _BlobProgress:
    """The store's byte counts for one blob, as progress that never counts a byte twice:
    each attempt (a resume, another source) first reports the offset it starts from."""

    def __init__(self, progress: Progress, name: str, total: int) -> None:
        self._progress = progress
        self._name = name
        self._position = 0
        self._reported = 0
        progress.start(name, total)

    def attempt(self) -> Callable[[int], None]:
        """The callback for one `store.ensure` call; its counts start again from 0."""
        self._position = 0
        return self._on_bytes

    def _on_bytes(self, nbytes: int) -> None:
        self._position += nbytes
        if self._position > self._reported:
            self._progress.advance(self._name, self._position - self._reported)
            self._reported = self._position
