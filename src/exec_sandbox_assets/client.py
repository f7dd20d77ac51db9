"""Resolution order (SPEC.md section 7) and the verified, parallel fetch.

1. explicit override dir, 2. EXEC_SANDBOX_IMAGES_DIR, 3. local build dir: trusted as is;
4. the cache (a stat against the record written when the file was verified);
5. sources in order: mirrors (registries and `oci:` layouts), then the default repository;
6. GitHub Releases.

The warm path (steps 1-4) imports nothing of the network or crypto stack and hashes
nothing. The cold path verifies the index signature, then every manifest by digest,
then every blob by digest, then the decompressed content, before a file appears under
its final name. Trust errors stop the fetch; transport errors move on to the next source.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from exec_sandbox_assets import catalog
from exec_sandbox_assets.cache.store import CacheTrust, OutputSpec, Store
from exec_sandbox_assets.catalog import AssetSpec, Kind
from exec_sandbox_assets.config import LATEST, Settings
from exec_sandbox_assets.errors import (
    AllSourcesFailedError,
    AssetError,
    AssetNotFoundError,
    AssetsNotFoundLocally,
    Attempt,
    FormatError,
    TransportError,
)
from exec_sandbox_assets.release.keyid import key_ids_of_files

if TYPE_CHECKING:
    from exec_sandbox_assets.oci.model import Index
    from exec_sandbox_assets.release.documents import AssetLayer
    from exec_sandbox_assets.sources import Source

log = logging.getLogger(__name__)

FLOATING_REF_PREFIX = "tag-"
# A blob body that broke off after making progress is resumed from the same source this
# many times (with exponential backoff, in the cache) before the next source is tried.
MAX_RESUMES = 4
TRUST_STATE_PREFIX = "trust-"


class Progress(Protocol):
    """What the CLI shows; the library passes None."""

    def start(self, name: str, total: int) -> None: ...

    def advance(self, name: str, nbytes: int) -> None: ...

    def finish(self, name: str) -> None: ...


@dataclass(frozen=True)
class VerifiedIndex:
    """An index whose signature verified (or that the user chose not to verify)."""

    tag: str
    version: str
    digest: str
    index: Index
    created: str | None
    source: str
    signed: bool
    key_ids: tuple[str, ...] = ()  # the trusted keys whose signatures admitted it


@dataclass(frozen=True)
class PlatformRelease:
    """The verified layers of one platform manifest of a verified index."""

    release: VerifiedIndex
    platform: tuple[str, str]
    manifest_digest: str
    layers: dict[str, AssetLayer] = field(hash=False)


class AssetClient:
    """Finds, fetches and verifies assets. Built from `Settings`; holds no event-loop state,
    so one client serves calls from any loop (the scheduler may run several)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = Store(
            settings.cache_dir, lock_timeout=settings.lock_timeout, trust=cache_trust(settings)
        )
        self._indexes: dict[str, VerifiedIndex] = {}
        self._platforms: dict[tuple[str, str, str], PlatformRelease] = {}

    # -- steps 1-4: no network, no hashing ---------------------------------------------

    def search_dirs(self, override: Path | None = None) -> list[Path]:
        dirs = [override, self.settings.images_dir, self.settings.local_build_dir]
        return [d for d in dirs if d is not None]

    def find_local(self, output_name: str, override: Path | None = None) -> Path | None:
        """An operator-provided file (steps 1-3); trusted as it is (SPEC.md section 7)."""
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
        dirs = self.search_dirs(override)
        for directory in dirs:
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
        missing: list[AssetSpec] = []
        for spec in specs:
            path = (
                self.find(spec.output_name, override)
                if use_local
                else self.find_cached(spec.output_name)
            )
            if path is not None:
                results[spec.output_name] = path
            else:
                missing.append(spec)
        if not missing:
            return results
        names = ", ".join(s.output_name for s in missing)
        if self.settings.offline and not self._local_sources_configured():
            error = AssetsNotFoundLocally(
                names, self.searched_places(override), "offline mode (EXEC_SANDBOX_OFFLINE=1)"
            )
            return results | {s.output_name: error for s in missing}
        results.update(await self._fetch_remote(missing, progress))
        return results

    def _local_sources_configured(self) -> bool:
        return any(m.startswith(("oci:", "oci-archive:")) for m in self.settings.mirrors)

    async def _fetch_remote(
        self, specs: Sequence[AssetSpec], progress: Progress | None
    ) -> dict[str, Path | BaseException]:
        from exec_sandbox_assets.sources import build_sources

        sources = build_sources(self.settings)
        try:
            if not sources:
                raise AssetsNotFoundLocally(
                    ", ".join(s.output_name for s in specs),
                    self.searched_places(),
                    "no source is configured (offline or air-gapped, and no mirror)",
                )
            by_platform: dict[tuple[str, str], list[AssetSpec]] = {}
            for spec in specs:
                by_platform.setdefault(self.platform_for(spec), []).append(spec)
            parts = [
                (await self.platform_release(sources, platform), group)
                for platform, group in by_platform.items()
            ]
            limit = asyncio.Semaphore(self.settings.concurrency)
            outcomes = await asyncio.gather(
                *(
                    self._fetch_one(sources, part, spec, limit, progress)
                    for part, group in parts
                    for spec in group
                ),
                return_exceptions=True,
            )
        except AssetError as exc:
            return {s.output_name: exc for s in specs}
        finally:
            await asyncio.gather(*(s.aclose() for s in sources), return_exceptions=True)
        results: dict[str, Path | BaseException] = {}
        for spec, outcome in zip((s for _, g in parts for s in g), outcomes, strict=True):
            if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                raise outcome  # cancellation, KeyboardInterrupt: not a per-asset failure
            results[spec.output_name] = outcome
        if self.settings.floating and any(isinstance(v, Path) for v in results.values()):
            self.commit_floating()
        return results

    def platform_for(self, spec: AssetSpec) -> tuple[str, str]:
        """Which platform manifest carries `spec`: the host's os with the asset's CPU."""
        if spec.kind is Kind.GVPROXY:
            os_, _, goarch = spec.arch.partition("-")
            return os_, goarch
        return self.settings.host_os, catalog.GOARCH[spec.arch]

    async def _fetch_one(
        self,
        sources: Sequence[Source],
        part: PlatformRelease,
        spec: AssetSpec,
        limit: asyncio.Semaphore,
        progress: Progress | None,
    ) -> Path:
        layer = part.layers.get(spec.name)
        if layer is None:
            raise AssetNotFoundError(
                f"release {part.release.version} ({part.release.source}) has no {spec.name} "
                f"for {'/'.join(part.platform)}; it has: {', '.join(sorted(part.layers))}"
            )
        out = OutputSpec(
            version=part.release.version,
            name=layer.output_name,
            layer_digest=layer.digest,
            layer_size=layer.size,
            compressed=layer.compressed,
            content_digest=layer.content_digest,
            content_size=layer.content_size,
            executable=layer.kind is Kind.GVPROXY,
            source=part.release.source,
            verified_by=part.release.key_ids,
        )
        bar = None if progress is None else _BlobProgress(progress, layer.output_name, layer.size)
        async with limit:
            # Blobs are content-addressed: any source may serve one, starting with the one
            # whose index we verified; a partial download resumes across sources.
            attempts: list[Attempt] = []
            for source in _prefer(sources, part.release.source):
                try:
                    path = await self._ensure_resuming(out, source, layer, bar)
                except TransportError as exc:
                    log.warning(
                        "blob download failed, trying next source",
                        extra={"source": source.name, "asset": spec.name, "error": str(exc)},
                    )
                    attempts.append(
                        Attempt(source.name, str(exc), isinstance(exc, AssetNotFoundError))
                    )
                    continue
                if progress is not None:
                    progress.finish(layer.output_name)
                return path
        raise AllSourcesFailedError(spec.name, attempts)

    async def _ensure_resuming(
        self,
        out: OutputSpec,
        source: Source,
        layer: AssetLayer,
        bar: _BlobProgress | None,
    ) -> Path:
        """`store.ensure` from one source; the store resumes a body that broke off."""
        progress = bar.attempt() if bar else None
        return await self.store.ensure(out, source.opener(layer), progress, resumes=MAX_RESUMES)

    async def platform_release(
        self, sources: Sequence[Source], platform: tuple[str, str]
    ) -> PlatformRelease:
        tag = self.settings.tag
        cache_key = (tag, *platform)
        if (hit := self._platforms.get(cache_key)) is not None:
            return hit
        attempts: list[Attempt] = []
        for source in sources:
            try:
                verified = await self._verified_index(source, tag)
                part = await self._platform_manifest(source, verified, platform)
            except TransportError as exc:
                log.warning(
                    "source failed, trying the next one",
                    extra={"source": source.name, "tag": tag, "error": str(exc)},
                )
                attempts.append(Attempt(source.name, str(exc), isinstance(exc, AssetNotFoundError)))
                continue
            self._platforms[cache_key] = part
            return part
        raise AllSourcesFailedError(f"release {tag} for {'/'.join(platform)}", attempts)

    async def _verified_index(self, source: Source, tag: str) -> VerifiedIndex:
        from exec_sandbox_assets.oci.model import Index, sha256_digest

        cached = self._indexes.get(tag)
        if cached is not None and cached.source == source.name:
            return cached
        data = await source.index(tag)
        digest = sha256_digest(data)
        where = f"{source.name} tag {tag} (index {digest})"
        signed = await self._check_signature(source, digest, where)
        index = Index.from_bytes(data, where)
        version = signed.version if signed and signed.version else _index_version(index, where)
        created = signed.created if signed else index.annotations.get(catalog.ANN_CREATED)
        if not self.settings.floating and _strip_v(version) != self.settings.version:
            from exec_sandbox_assets.errors import VersionMismatchError

            raise VersionMismatchError(
                f"{where}: holds release {version}, but {self.settings.version} was asked for"
            )
        verified = VerifiedIndex(
            tag,
            _strip_v(version),
            digest,
            index,
            created,
            source.name,
            signed is not None,
            signed.key_ids if signed else (),
        )
        if self.settings.floating:
            self._remember_floating(source, verified)
        self._indexes[tag] = verified
        log.info(
            "release index verified",
            extra={"source": source.name, "tag": tag, "digest": digest, "version": version},
        )
        return verified

    async def _check_signature(self, source: Source, digest: str, where: str) -> SignedInfo | None:
        from exec_sandbox_assets.release import keys, policy, signing

        if self.settings.insecure_skip_verify:
            log.warning(
                "SIGNATURE VERIFICATION DISABLED (EXEC_SANDBOX_INSECURE_SKIP_VERIFY=1): "
                "accepting an unverified release index",
                extra={"source": source.name, "digest": digest},
            )
            return None
        trust_policy = policy.TrustPolicy(
            keys=tuple(keys.load_public_key_file(p) for p in self.settings.trusted_keys),
            threshold=self.settings.threshold,
            allow_downgrade=self.settings.allow_downgrade,
        )
        # Fail before any remote byte beyond the index is fetched.
        policy.require_keys(trust_policy, f"{where}: refusing unverified remote content")
        sig_manifest = await source.signature(digest)
        layers = signing.read_signature_manifest(sig_manifest, f"{where} signature")
        pairs = [
            (await source.payload(layer, n), layer.signature) for n, layer in enumerate(layers)
        ]
        newest = None
        if self.settings.floating:
            state = self.store.read_state(TRUST_STATE_PREFIX + source.key)
            value = state.get("created") if state else None
            newest = value if isinstance(value, str) else None
        result = policy.verify_index(
            trust_policy,
            digest,
            pairs,
            expected_version=None if self.settings.floating else self.settings.version,
            newest_accepted_created=newest,
            where=where,
        )
        return SignedInfo(result.version, result.created, result.key_ids)

    def _remember_floating(self, source: Source, verified: VerifiedIndex) -> None:
        if verified.created:
            self.store.write_state(TRUST_STATE_PREFIX + source.key, {"created": verified.created})

    async def _platform_manifest(
        self, source: Source, verified: VerifiedIndex, platform: tuple[str, str]
    ) -> PlatformRelease:
        from exec_sandbox_assets.oci.model import Manifest
        from exec_sandbox_assets.release.documents import read_asset_layers

        desc = verified.index.for_platform(*platform)
        if desc is None:
            have = ", ".join(str(d.platform) for d in verified.index.manifests if d.platform)
            raise AssetNotFoundError(
                f"{source.name}: release {verified.version} has no {'/'.join(platform)} "
                f"manifest (it has: {have or 'none'})"
            )
        data = await source.manifest(desc)
        where = f"{source.name} manifest {desc.digest}"
        manifest = Manifest.from_bytes(data, where)
        return PlatformRelease(verified, platform, desc.digest, read_asset_layers(manifest, where))

    def commit_floating(self) -> None:
        """After a successful fetch of a floating tag, point the cache's ref at its version."""
        verified = self._indexes.get(LATEST)
        if verified is not None:
            self.store.write_state(
                FLOATING_REF_PREFIX + LATEST,
                {"version": verified.version, "digest": verified.digest},
            )


@dataclass(frozen=True)
class SignedInfo:
    version: str | None
    created: str | None
    key_ids: tuple[str, ...] = ()


def cache_trust(settings: Settings) -> CacheTrust:
    """Which cache records the warm path may serve under these settings: key ids from
    the PEM files with the stdlib only (no crypto import on the boot path)."""
    return CacheTrust(
        key_ids=key_ids_of_files(settings.trusted_keys),
        threshold=settings.threshold,
        insecure=settings.insecure_skip_verify,
    )


def _strip_v(version: str) -> str:
    return version[1:] if version.startswith("v") else version


def _index_version(index: Index, where: str) -> str:
    version = index.annotations.get(catalog.ANN_VERSION)
    if not version:
        raise FormatError(f"index has no {catalog.ANN_VERSION} annotation", where)
    return version


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
