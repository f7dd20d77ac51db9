"""The cache commands of the CLI: pull, status, verify, gc, keygen.

Each `run_*` takes the command's `Context` (arguments, settings, output choices), prints
either a human summary or one JSON document, and returns an exit code (see `output`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exec_sandbox_assets.base.errors import AssetNotFoundError, ConfigError, TrustError
from exec_sandbox_assets.cli.login import with_given_credentials
from exec_sandbox_assets.cli.output import (
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_TRUST,
    Failure,
    emit_json,
    err,
    error_message,
    group_failures,
    human_size,
    json_result,
    out,
    short_digest,
    table,
    worst_exit_code,
)
from exec_sandbox_assets.cli.progress import progress_display
from exec_sandbox_assets.cli.repair import pull_status, repair, repair_json
from exec_sandbox_assets.cli.table import Context
from exec_sandbox_assets.client import AssetClient
from exec_sandbox_assets.config import Settings
from exec_sandbox_assets.release import catalog
from exec_sandbox_assets.release.catalog import AssetSpec, Language

if TYPE_CHECKING:  # status, verify and gc import it when they run; pull never needs it
    from exec_sandbox_assets.cache import admin as cache_admin
    from exec_sandbox_assets.cache.store import RecordInfo

# -- shared ------------------------------------------------------------------------------------


def record_json(info: RecordInfo) -> dict[str, Any]:
    """One cached file, as `pull --json` and `status --json` both report it."""
    return {
        "name": info.name,
        "path": str(info.path),
        "size": info.size,
        "digest": info.content_digest or None,
        "layer_digest": info.layer_digest or None,
        "source": info.source or None,
        "verified_at": info.verified_at or None,
        "verified": info.valid,
    }


def first_line(exc: BaseException) -> str:
    return error_message(exc).splitlines()[0]


# -- pull --------------------------------------------------------------------------------------


def pull_specs(os_: str, goarch: str, languages: Sequence[str] | None) -> list[AssetSpec]:
    """Kernel(s), initramfs, the base images of `languages` (default: all) and gvproxy."""
    arch = catalog.ARCH_OF_GOARCH[goarch]
    specs = [catalog.kernel(arch)]
    if (pvh := catalog.pvh_kernel(arch)) is not None:
        specs.append(pvh)
    specs.append(catalog.initramfs(arch))
    chosen = list(dict.fromkeys(languages)) if languages else [lang.value for lang in Language]
    specs.extend(catalog.base_image(lang, arch) for lang in chosen)
    specs.append(catalog.gvproxy(os_, goarch))
    return specs


def pull_settings(args: argparse.Namespace, settings: Settings) -> Settings:
    """Apply `--from`, `--platform` and `--arch` to the settings."""
    if args.source:
        from exec_sandbox_assets.oci.reference import parse_source_ref

        parse_source_ref(args.source)  # a bad reference is a usage error, before anything
        rest = tuple(m for m in settings.mirrors if m != args.source)
        settings = settings.with_(mirrors=(args.source, *rest))
    if args.platform:
        os_, goarch = catalog.parse_platform(args.platform)
        settings = settings.with_(host_os=os_, host_goarch=goarch)
    elif args.arch:
        settings = settings.with_(host_goarch=catalog.GOARCH[catalog.check_arch(args.arch)])
    return settings


def run_pull(ctx: Context) -> int:
    args = ctx.args
    settings = with_given_credentials(args, pull_settings(args, ctx.settings))
    languages = None if args.all else args.language
    for lang in languages or ():
        catalog.parse_language(lang)
    specs = pull_specs(settings.host_os, settings.host_goarch, languages)
    client = AssetClient(settings)
    started = time.monotonic()
    # --force: hash what is cached first; what does not match is fetched again below.
    checked = client.check_cached_content(specs) if args.force else {}
    cached_before = {s.output_name for s in specs if client.find_cached(s.output_name)}
    with progress_display(ctx.ui, ctx.log_handler) as bars:
        results = asyncio.run(client.fetch_each(specs, use_local=False, progress=bars))
    seconds = time.monotonic() - started

    version = client.cached_version()
    records = {r.name: r for r in client.store.outputs(version)} if version else {}
    files: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    errors: list[tuple[str, BaseException]] = []
    for spec in specs:
        result = results[spec.output_name]
        if isinstance(result, BaseException):
            if not spec.required and isinstance(result, AssetNotFoundError):
                skipped.append({"name": spec.output_name, "reason": first_line(result)})
            else:
                errors.append((spec.output_name, result))
            continue
        record = records.get(spec.output_name)
        entry = (
            record_json(record)
            if record is not None
            else {"name": spec.output_name, "path": str(result), "size": result.stat().st_size}
        )
        entry["kind"] = spec.kind.value
        entry["downloaded"] = spec.output_name not in cached_before
        if args.force:
            entry["content_check"] = checked.get(spec.output_name)
        files.append(entry)
    failures = group_failures(errors)
    code = worst_exit_code(f.error for f in failures)
    platform = f"{settings.host_os}/{settings.host_goarch}"
    vdir = client.store.version_dir(version) if version else None
    verified = client.verified_index(settings.tag)
    index_digest = verified.digest if verified else None
    key_ids = list(verified.key_ids) if verified else []
    identities = [s.identity for s in verified.identities] if verified else []

    if args.json:
        emit_json(
            json_result(
                {
                    "version": version,
                    "tag": settings.tag,
                    "platform": platform,
                    "index_digest": index_digest,
                    "signed_by": key_ids,
                    "signed_by_identity": identities,
                    "source": verified.source if verified else None,
                    "cache_dir": settings.cache_dir,
                    "dir": vdir,
                    "seconds": round(seconds, 3),
                    "files": files,
                    "skipped": skipped,
                },
                failures,
            )
        )
    elif not ctx.ui.quiet and (files or not failures):
        # A pull that got nothing says so on stderr only, not "0 file(s)" on stdout first.
        where = f" into {vdir}" if vdir else ""
        out(f"release {version or '?'} (tag {settings.tag}) for {platform}{where}")
        if verified is not None:
            signer = (
                f"signed by {', '.join([k[:16] for k in key_ids] + identities)}"
                if key_ids or identities
                else "signature NOT verified (--insecure-skip-verify)"
            )
            out(f"  index {verified.digest} from {verified.source}, {signer}")
        rows = [
            (
                f["name"],
                human_size(int(f["size"])),
                pull_status(f),
                str(f.get("source") or ""),
            )
            for f in files
        ]
        rows += [(s["name"], "-", "skipped", s["reason"]) for s in skipped]
        # Per-file failures get a row; a release-level one is reported once, below.
        rows += [
            (f.names[0], "-", "FAILED", first_line(f.error))
            for f in failures
            if not f.release_level
        ]
        for line in table(rows):
            out(line)
        total = sum(int(f["size"]) for f in files)
        fetched = sum(1 for f in files if f["downloaded"])
        failed = sum(len(f.names) for f in failures)
        out(
            f"{len(files)} file(s), {human_size(total)}: {fetched} downloaded, "
            f"{len(files) - fetched} already cached"
            + (f", {failed} failed" if failed else "")
            + f" ({seconds:.1f}s)"
        )
    for failure in failures:
        names = "every file" if len(failure.names) == len(specs) > 1 else ", ".join(failure.names)
        err(f"error: {names}: {error_message(failure.error)}")
    return code


# -- status ------------------------------------------------------------------------------------


def status_json(listing: cache_admin.CacheListing, settings: Settings) -> dict[str, Any]:
    from exec_sandbox_assets.cache import admin as cache_admin

    tags_of: dict[str, list[str]] = {}
    for tag, version in listing.floating.items():
        tags_of.setdefault(version, []).append(tag)
    return json_result(
        {
            "cache_dir": listing.root,
            "tag": settings.tag,
            "floating": listing.floating,
            "total_size": listing.total_size,
            "versions": [
                {
                    "version": v.version,
                    "path": v.path,
                    "size": v.size,
                    "tags": sorted(tags_of.get(v.version, [])),
                    "files": [record_json(o) for o in v.outputs],
                    "temp_files": [{"path": t.path, "size": t.size} for t in v.temps],
                }
                for v in listing.versions
            ],
            "partials": [
                {"path": p.path, "size": p.size, "digest": cache_admin.blob_digest(p.path)}
                for p in listing.partials
            ],
            "orphan_blobs": [
                {"path": b.path, "size": b.size, "digest": cache_admin.blob_digest(b.path)}
                for b in listing.blobs
            ],
            "temp_files": [{"path": t.path, "size": t.size} for t in listing.state_temps],
        }
    )


def run_status(ctx: Context) -> int:
    from exec_sandbox_assets.cache import admin as cache_admin

    args, settings = ctx.args, ctx.settings
    client = AssetClient(settings)
    listing = cache_admin.scan(client.store)
    if args.json:
        emit_json(status_json(listing, settings))
        return EXIT_OK
    if ctx.ui.quiet:
        return EXIT_OK
    out(f"cache {listing.root} ({human_size(listing.total_size)})")
    if not listing.versions:
        out("  no cached release")
    for v in listing.versions:
        tags = [t for t, ver in listing.floating.items() if ver == v.version]
        label = f" [{', '.join(tags)}]" if tags else ""
        out(f"version {v.version}{label}: {human_size(v.size)} in {v.path}")
        rows = [
            (
                o.name,
                human_size(o.size),
                "verified" if o.valid else ("CHANGED" if o.content_digest else "UNVERIFIED"),
                short_digest(o.content_digest) if o.content_digest else "-",
                f"from {o.source}" if o.source else "",
            )
            for o in v.outputs
        ]
        rows += [(t.path.name, human_size(t.size), "temp file", "", "") for t in v.temps]
        for line in table(rows):
            out(line)
    for title, entries in (
        ("partial downloads (resumable)", listing.partials),
        ("orphan blobs (never installed)", listing.blobs),
        ("temp files", listing.state_temps),
    ):
        if entries:
            out(f"{title}:")
            for line in table((str(e.path), human_size(e.size)) for e in entries):
                out(line)
    return EXIT_OK


# -- verify ------------------------------------------------------------------------------------


def run_verify(ctx: Context) -> int:
    from exec_sandbox_assets.cache import admin as cache_admin

    args, settings = ctx.args, ctx.settings
    client = AssetClient(settings)
    cached = client.store.versions()
    if settings.floating:
        versions = cached
    else:
        versions = [settings.version] if settings.version in cached else []
        if not versions:
            missing = AssetNotFoundError(
                f"version {settings.version} is not cached in {settings.cache_dir}"
            )
            if args.json:
                emit_json(json_result({"full": args.full, "results": []}, [Failure(missing)]))
            err(f"error: {missing}")
            return EXIT_NOT_FOUND
    full = args.full or args.repair
    results = [
        r
        for v in versions
        for r in cache_admin.verify_version(client.store, v, full=full, restat=args.repair)
    ]
    repaired = repair(settings, [r for r in results if not r.ok]) if args.repair else {}
    bad = [r for r in results if not r.ok and not isinstance(repaired.get(r.path), Path)]
    unrepaired = [e for r in bad if isinstance(e := repaired.get(r.path), BaseException)]
    mismatch = (
        [Failure(TrustError(_mismatch_message(bad)), tuple(r.name for r in bad))] if bad else []
    )
    if args.json:
        emit_json(
            json_result(
                {
                    "full": full,
                    "repair": args.repair,
                    "results": [
                        {
                            "version": r.version,
                            "name": r.name,
                            "path": r.path,
                            "ok": r.ok,
                            "problem": r.problem or None,
                            "note": r.note or None,
                            "repaired": (
                                repair_json(repaired[r.path]) if r.path in repaired else None
                            ),
                        }
                        for r in results
                    ],
                },
                mismatch,
            )
        )
    elif not ctx.ui.quiet:
        how = "content digests (full)" if full else "stat against verification records"
        out(f"checked {len(results)} file(s) in {len(versions)} version(s): {how}")
        for r in results:
            status = "ok" if r.ok else "MISMATCH"
            detail = r.problem or r.note
            out(f"  {status:<8} {r.version}/{r.name}" + (f": {detail}" if detail else ""))
            fixed = repaired.get(r.path)
            if isinstance(fixed, Path):
                out(f"  repaired {r.version}/{r.name}: fetched again and verified")
            elif fixed is not None:
                out(f"  FAILED   {r.version}/{r.name}: not repaired: {first_line(fixed)}")
    if bad:
        err(f"error: {_mismatch_message(bad)}")
        return worst_exit_code(unrepaired) if unrepaired else EXIT_TRUST
    return EXIT_OK


def _mismatch_message(bad: Sequence[cache_admin.VerifyResult]) -> str:
    return f"{len(bad)} file(s) failed verification: " + ", ".join(str(r.path) for r in bad)


# -- gc ----------------------------------------------------------------------------------------


def run_gc(ctx: Context) -> int:
    from exec_sandbox_assets.cache import admin as cache_admin

    args, settings = ctx.args, ctx.settings
    if args.keep < 0:
        raise ConfigError(f"--keep must be 0 or more, not {args.keep}")
    client = AssetClient(settings)
    listing = cache_admin.scan(client.store)
    protected = () if settings.floating else (settings.version,)
    plan = cache_admin.plan_gc(
        listing, keep=args.keep, protected=protected, partials=args.partials, now=time.time()
    )
    report = cache_admin.run_gc(client.store, plan, dry_run=args.dry_run)
    if args.json:
        emit_json(
            json_result(
                {
                    "dry_run": report.dry_run,
                    "kept_versions": report.kept_versions,
                    "items": [
                        {
                            "kind": o.item.kind,
                            "path": o.item.path,
                            "size": o.item.size,
                            "reason": o.item.reason,
                            "removed": o.removed,
                            "skipped": o.skipped or None,
                        }
                        for o in report.outcomes
                    ],
                    "freed": report.freed,
                    "kept_resumable": [{"path": e.path, "size": e.size} for e in report.resumable],
                }
            )
        )
        return EXIT_OK
    if ctx.ui.quiet:
        return EXIT_OK
    verb = "would remove" if report.dry_run else "removed"
    kept = ", ".join(report.kept_versions) or "none"
    out(f"cache {listing.root}: keeping version(s) {kept}")
    rows = [
        (
            verb if o.removed else "skipped",
            o.item.kind,
            str(o.item.path),
            human_size(o.item.size),
            o.item.reason if o.removed else o.skipped,
        )
        for o in report.outcomes
    ]
    for line in table(rows):
        out(line)
    removed = sum(1 for o in report.outcomes if o.removed)
    total = "would free" if report.dry_run else "freed"
    out(f"{total} {human_size(report.freed)} ({report.freed} bytes) in {removed} item(s)")
    if report.resumable:
        size = sum(e.size for e in report.resumable)
        out(
            f"kept {len(report.resumable)} resumable download(s), {human_size(size)}: the next "
            "pull resumes them; `gc --partials` removes them"
        )
    return EXIT_OK


# -- keygen ------------------------------------------------------------------------------------


def run_keygen(ctx: Context) -> int:
    args = ctx.args
    from exec_sandbox_assets.release import keys

    password: bytes | None = None
    if args.password_env:
        # The variable the user named, read at this edge (not a setting: config.py).
        value = os.environ.get(args.password_env)
        if value is None:
            raise ConfigError(f"--password-env {args.password_env}: that variable is not set")
        password = value.encode()
    prefix = Path(args.out)
    private, public = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    key = keys.generate_key(args.algorithm)
    keys.write_key_pair(key, private, public, password)
    state = "encrypted" if password else "not encrypted"
    if ctx.ui.quiet:
        return EXIT_OK
    out(f"wrote {private} (private {args.algorithm} key, mode 0600, {state})")
    out(f"wrote {public} (public key, id {key.public.key_id[:16]})")
    out(f"sign:  exec-sandbox-assets publish --key {private} ...")
    out(f"trust: EXEC_SANDBOX_TRUSTED_KEYS={public}  (or --trusted-key {public})")
    return EXIT_OK


__all__ = [
    "pull_settings",
    "pull_specs",
    "record_json",
    "run_gc",
    "run_keygen",
    "run_pull",
    "run_status",
    "run_verify",
    "status_json",
]
