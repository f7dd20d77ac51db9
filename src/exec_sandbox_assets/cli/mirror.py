"""`mirror SRC DST`: copy signed releases between registries, layouts and archives.

A thin shell over `mirror.mirror`: settings in, progress bars (blob downloads) on a
terminal, a summary or one JSON document out.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

from exec_sandbox_assets.cli.login import given_credentials, registry_host
from exec_sandbox_assets.cli.output import (
    EXIT_OK,
    emit_json,
    human_size,
    json_result,
    out,
    short_digest,
)
from exec_sandbox_assets.cli.progress import ProgressDisplay, progress_display
from exec_sandbox_assets.cli.table import Context
from exec_sandbox_assets.release import catalog

if TYPE_CHECKING:
    from exec_sandbox_assets.mirror import MirrorEvent, MirrorResult


class MirrorProgress:
    """Turns mirror events into bars: one per blob being downloaded, plus the overall one."""

    def __init__(self, bars: ProgressDisplay, several_versions: bool) -> None:
        self._bars = bars
        self._prefix = several_versions
        self._labels: dict[tuple[str, str], str] = {}  # (version, digest) -> bar label

    def _key(self, event: MirrorEvent) -> str:
        """A label per blob: its name, made unique when two blobs share one."""
        key = (event.version, event.digest)
        if key not in self._labels:
            label = event.name or short_digest(event.digest)
            if self._prefix:
                label = f"{event.version}: {label}"
            if label in self._labels.values():
                label = f"{label} {short_digest(event.digest)}"
            self._labels[key] = label
        return self._labels[key]

    def __call__(self, event: MirrorEvent) -> None:
        if event.kind == "blob-start":
            self._bars.start(self._key(event), event.size)
        elif event.kind == "blob-progress":
            self._bars.advance(self._key(event), event.size)
        elif event.kind == "blob-done":
            self._bars.finish(self._key(event))


def result_json(result: MirrorResult, seconds: float) -> dict[str, Any]:
    return json_result(
        {
            "source": result.source,
            "destination": result.destination,
            "seconds": round(seconds, 3),
            "blobs_copied": result.blobs_copied,
            "bytes_copied": result.bytes_copied,
            "blobs_skipped": result.blobs_skipped,
            "blobs_mounted": result.blobs_mounted,
            "releases": [
                {
                    "version": r.version,
                    "tags": list(r.tags),
                    "index_digest": r.index_digest,
                    "manifests": {f"{o}/{a}": d for (o, a), d in r.manifest_digests.items()},
                    "signature_digest": r.signature_digest,
                    "signed_by": list(r.signed_by),
                    "blobs_copied": r.blobs_copied,
                    "bytes_copied": r.bytes_copied,
                    "blobs_skipped": r.blobs_skipped,
                    "blobs_mounted": r.blobs_mounted,
                    "latest_kept": r.latest_kept,
                }
                for r in result.releases
            ],
        }
    )


def run_mirror(ctx: Context) -> int:
    from exec_sandbox_assets.mirror import mirror

    args, settings = ctx.args, ctx.settings
    creds = given_credentials(args)
    # Explicit credentials go to the destination when it is a registry, else the source.
    to_dst = creds is not None and registry_host(args.dst) is not None

    versions = list(args.versions) if args.versions else [settings.version]
    platforms = [catalog.parse_platform(p) for p in args.platforms] if args.platforms else None
    work_dir = args.work_dir or settings.cache_dir / "mirror-work"
    started = time.monotonic()
    with progress_display(ctx.ui, ctx.log_handler) as bars:
        result = mirror(
            args.src,
            args.dst,
            versions=versions,
            work_dir=work_dir,
            platforms=platforms,
            trusted_keys=settings.trusted_keys,
            threshold=settings.threshold,
            trusted_workflows=settings.trusted_workflows,
            sigstore_root=settings.sigstore_root,
            insecure_skip_verify=settings.insecure_skip_verify,
            allow_downgrade=settings.allow_downgrade,
            ca_bundle=settings.ca_bundle,
            docker_config=settings.docker_config,
            src_credentials=None if to_dst else creds,
            dst_credentials=creds if to_dst else None,
            progress=MirrorProgress(bars, len(versions) > 1) if bars is not None else None,
            transfer=settings.transfer_policy(),
        )
    seconds = time.monotonic() - started
    if args.work_dir is None:  # ours: empty after a success (a failure keeps partials)
        with contextlib.suppress(OSError):
            work_dir.rmdir()
    if args.json:
        emit_json(result_json(result, seconds))
        return EXIT_OK
    if ctx.ui.quiet:
        return EXIT_OK
    out(f"mirrored {result.source} -> {result.destination} ({seconds:.1f}s)")
    for r in result.releases:
        signed = (
            f"signature verified ({', '.join(k[:16] for k in r.signed_by)})"
            if r.signed_by
            else "signature NOT verified (--insecure-skip-verify)"
        )
        tags = ", ".join(r.tags) or "none (see the log)"
        out(f"  {r.version}: index {r.index_digest}; tags {tags}; {signed}")
        out(
            f"    {r.blobs_copied} blob(s) copied ({human_size(r.bytes_copied)}), "
            f"{r.blobs_skipped} already there, {r.blobs_mounted} mounted"
            + ("; the destination's newer 'latest' was kept" if r.latest_kept else "")
        )
    return EXIT_OK


__all__ = ["MirrorProgress", "result_json", "run_mirror"]
