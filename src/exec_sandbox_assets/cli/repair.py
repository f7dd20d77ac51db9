"""The repair side of the cache commands: `verify --repair` fetches again what failed its
check, `pull --force` says what its content check found (cache/content.py does the
checking)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exec_sandbox_assets.base.errors import AssetNotFoundError
from exec_sandbox_assets.cli.output import error_message
from exec_sandbox_assets.client import AssetClient
from exec_sandbox_assets.config import Settings
from exec_sandbox_assets.release import catalog
from exec_sandbox_assets.release.catalog import AssetSpec

if TYPE_CHECKING:
    from exec_sandbox_assets.cache.admin import VerifyResult


def repair(settings: Settings, bad: Sequence[VerifyResult]) -> dict[Path, Path | BaseException]:
    """Fetch again (and verify) every file of `bad`, each from the release of its own
    version: cached path -> the installed path, or why it could not be."""
    fixed: dict[Path, Path | BaseException] = {}
    by_version: dict[str, list[VerifyResult]] = {}
    for r in bad:
        by_version.setdefault(r.version, []).append(r)
    for version, results in by_version.items():
        specs: dict[str, AssetSpec] = {}
        for r in results:
            spec = catalog.spec_for_name(r.name)
            if spec is None:
                fixed[r.path] = AssetNotFoundError(f"{r.name} is not an asset name; not fetched")
            else:
                specs[r.name] = spec
        client = AssetClient(settings.with_(version=version))
        got = asyncio.run(client.fetch_each(list(specs.values()), use_local=False))
        for r in results:
            if r.name in specs:
                fixed[r.path] = got[specs[r.name].output_name]
    return fixed


def repair_json(result: Path | BaseException) -> dict[str, Any]:
    if isinstance(result, Path):
        return {"ok": True, "path": result}
    return {"ok": False, "error": error_message(result)}


def pull_status(entry: dict[str, Any]) -> str:
    if not entry["downloaded"]:
        return "cached, content checked" if entry.get("content_check") else "cached"
    if entry.get("content_check") == "mismatch":
        return "downloaded (the cached copy was corrupt)"
    return "downloaded"


__all__ = ["pull_status", "repair", "repair_json"]
