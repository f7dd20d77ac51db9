"""`demo`: the whole round trip on one machine, with no server and no real build.

sample build -> key pair -> signed release in oci:DIR/layout (or a registry)
-> pull it back through the client (only that source, air-gapped, cache under DIR)
-> compare every file with its input, byte for byte
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from exec_sandbox_assets.cli.commands import pull_specs
from exec_sandbox_assets.cli.output import EXIT_FAILED, EXIT_OK, err, human_size
from exec_sandbox_assets.cli.output import out as print_line
from exec_sandbox_assets.cli.progress import progress_display
from exec_sandbox_assets.cli.table import Context
from exec_sandbox_assets.client import AssetClient
from exec_sandbox_assets.publish.compress import hash_file
from exec_sandbox_assets.release import catalog, keys

DEMO_VERSION = "0.0.1-demo"
KEY_NAME = "demo"


def _key_pair(keys_dir: Path) -> tuple[Path, Path, bool]:
    private, public = keys_dir / f"{KEY_NAME}.key", keys_dir / f"{KEY_NAME}.pub"
    if private.is_file() and public.is_file():
        return private, public, False
    keys_dir.mkdir(parents=True, exist_ok=True)
    keys.write_key_pair(keys.generate_key(), private, public, None)
    return private, public, True


def run_demo(ctx: Context) -> int:
    args, settings = ctx.args, ctx.settings

    def out(line: str = "") -> None:
        if not ctx.ui.quiet:
            print_line(line)

    from exec_sandbox_assets.cli.publish import signature_count
    from exec_sandbox_assets.publish import PublishRequest, make_sample_inputs, publish

    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="exec-sandbox-demo-"))
    base = base.expanduser().resolve()
    base.mkdir(parents=True, exist_ok=True)
    os_, goarch = settings.host_os, settings.host_goarch
    started = time.monotonic()

    dist = make_sample_inputs(base / "dist", arches=(catalog.ARCH_OF_GOARCH[goarch],), oses=(os_,))
    inputs = sorted(p for p in dist.iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in inputs)
    out(f"1. sample build: {len(inputs)} files, {human_size(size)} in {dist}")

    private, public, created = _key_pair(base / "keys")
    how = "generated" if created else "reusing"
    out(f"2. signing key: {how} {private} (trust {public})")

    target = args.registry or f"oci:{base / 'layout'}"  # the global --registry option
    result = publish(
        PublishRequest(
            inputs=(dist,),
            version=DEMO_VERSION,
            targets=(target,),
            keys=(private,),
            work_dir=base / "work",
            platforms=((os_, goarch),),
            level=args.level,
            ca_bundle=settings.ca_bundle,
        )
    )
    out(
        f"3. published {result.version} to {target}: index {result.index_digest}, "
        f"{signature_count(result)} ({result.signature_tag})"
    )

    pull_settings = settings.with_(
        cache_dir=base / "cache",
        images_dir=None,
        local_build_dir=None,
        offline=False,
        airgap=True,
        registry=target,
        mirrors=(target,),
        trusted_keys=(public,),
        threshold=1,
        insecure_skip_verify=False,
        version=DEMO_VERSION,
    )
    client = AssetClient(pull_settings)
    specs = pull_specs(os_, goarch, None)
    with progress_display(ctx.ui, ctx.log_handler) as bars:
        paths = asyncio.run(client.fetch(specs, use_local=False, progress=bars))
    vdir = client.store.version_dir(DEMO_VERSION)
    out(
        f"4. pulled {len(paths)} files through the client (air-gapped, only {target} "
        f"configured, signature checked with {public.name}) into {vdir}"
    )

    mismatched = [
        name for name, path in sorted(paths.items()) if hash_file(path) != hash_file(dist / name)
    ]
    if mismatched:
        err(f"error: pulled files differ from their inputs: {', '.join(mismatched)}")
        return EXIT_FAILED
    out(f"5. all {len(paths)} files are byte-identical to the inputs")
    out(f"done in {time.monotonic() - started:.1f}s; everything is under {base}")
    out("use it:")
    out(
        f"  EXEC_SANDBOX_REGISTRY_MIRRORS={target} EXEC_SANDBOX_TRUSTED_KEYS={public} "
        f"EXEC_SANDBOX_AIRGAP=1 exec-sandbox-assets --asset-version {DEMO_VERSION} pull"
    )
    out(f"  exec-sandbox-assets --trusted-key {public} inspect {target}:v{DEMO_VERSION}")
    return EXIT_OK


__all__ = ["DEMO_VERSION", "run_demo"]
