"""Runs inside the Python 3.12 venv holding exec-sandbox 0.22.0 (see tests/es022.py).

`python -m es022_probe scheduler`   start exec-sandbox's real Scheduler (system probes,
                                    ensure_assets, validate_kernel_initramfs, snapshot
                                    managers); print what it resolved as JSON
`python -m es022_probe sbx ARGS...` exec-sandbox's real `sbx` CLI
`python -m es022_probe error KIND`  call the assets module so that it fails; print the
                                    exception's class, bases and cause as JSON

Only what needs QEMU is stubbed: the overlay pool (qemu-storage-daemon; base-image
discovery still runs) and the VM boot, which instead of booting raises
`SandboxError("VM boot stubbed: ...")` naming the kernel, initramfs and base image it
would boot, so `sbx run` ends with exit 125 and that message when everything before the
boot worked. Python 3.12 only; no pytest.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

COLD_PATH_PACKAGES = ("httpx", "cryptography", "zstandard")


def apply_stubs() -> None:
    from exec_sandbox import overlay_pool, vm_manager  # type: ignore[import-not-found]
    from exec_sandbox.exceptions import SandboxError  # type: ignore[import-not-found]

    async def pool_start(self: Any, base_images: list[Path] | None = None) -> None:
        found = self._discover_base_images() if base_images is None else base_images
        print(json.dumps({"overlay_pool_base_images": [str(p) for p in found]}), file=sys.stderr)
        self._started = True

    async def pool_stop(self: Any) -> None:
        self._started = False

    async def create_vm(self: Any, language: Any, *args: Any, **kwargs: Any) -> Any:
        kernel = self.settings.kernel_path
        base = self.get_base_image(language)
        raise SandboxError(f"VM boot stubbed: {language} from {kernel} with {base}")

    overlay_pool.OverlayPool.start = pool_start
    overlay_pool.OverlayPool.stop = pool_stop
    vm_manager.VmManager.create_vm = create_vm


async def start_scheduler() -> dict[str, Any]:
    from exec_sandbox import Scheduler, SchedulerConfig, assets

    async with Scheduler(SchedulerConfig(warm_pool_size=0)) as scheduler:
        images_dir = scheduler._images_dir
        assert images_dir is not None
        files = sorted(p.name for p in images_dir.iterdir() if p.is_file())
        return {
            "images_dir": str(images_dir),
            "files": files,
            "assets_module": getattr(assets, "__name__", ""),
            # The network and crypto stack of the cold path (exec-sandbox brings aiohttp).
            "cold_path_modules": sorted(
                m for m in sys.modules if m.partition(".")[0] in COLD_PATH_PACKAGES
            ),
        }


def describe(exc: BaseException) -> dict[str, Any]:
    cause = exc.__cause__
    return {
        "class": type(exc).__name__,
        "mro": [f"{c.__module__}.{c.__qualname__}" for c in type(exc).__mro__],
        "message": str(exc),
        "cause": None if cause is None else f"{type(cause).__module__}.{type(cause).__name__}",
    }


async def provoke(kind: str) -> dict[str, Any]:
    """Call the assets module the way exec-sandbox does; the environment sets up the fault."""
    from exec_sandbox import assets

    try:
        if kind == "ensure":
            await assets.ensure_assets()
        elif kind == "ensure-no-download":
            await assets.ensure_assets(download=False)
        elif kind == "kernel":
            await assets.fetch_kernel()
        elif kind == "kernel-arm64":  # Go's name for aarch64: no such kernel
            await assets.fetch_kernel(arch="arm64")
        elif kind == "base":
            await assets.fetch_base_image("python")
        else:
            raise SystemExit(f"unknown kind {kind}")
    except BaseException as exc:  # the whole point: what class reaches the caller
        return describe(exc)
    return {"class": None}


def main(argv: list[str]) -> int:
    mode, *rest = argv
    if mode == "sbx":
        apply_stubs()
        from exec_sandbox.cli import main as sbx_main  # type: ignore[import-not-found]

        sys.argv = ["sbx", *rest]
        sbx_main()
        return 0
    if mode == "scheduler":
        apply_stubs()
        try:
            print(json.dumps(asyncio.run(start_scheduler())))
        except Exception as exc:
            print(json.dumps({"error": describe(exc)}))
        return 0
    if mode == "error":
        print(json.dumps(asyncio.run(provoke(rest[0]))))
        return 0
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
