"""Find the files of a release in the build output directories.

Every catalog entry of the chosen platforms is looked up by its catalog name in each
input directory, in order: `NAME.zst` (already compressed, taken as is after a check)
or the raw `NAME` (compressed by the publisher). When both exist the raw file wins:
compression is deterministic, so the blob is then a function of the raw bytes and
the level, and a stale `.zst` beside a fresh build cannot slip into a release.

Everything wrong is reported at once, on one line: every missing file, every
directory searched, and files that look like ours but match no catalog name (`vmlinuz-x86-64`,
`python-3.13-base-...`), which are the usual cause of a "missing" file.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from exec_sandbox_assets.base.errors import ConfigError
from exec_sandbox_assets.release import catalog
from exec_sandbox_assets.release.catalog import AssetSpec

log = logging.getLogger(__name__)

# Names a build of ours produces; anything matching this but no catalog name is
# most likely misnamed.
_LOOKS_OURS = re.compile(
    r"^(vmlinu[xz]|initramfs|initrd|gvproxy|bzimage|kernel)|(base|rootfs).*\.(qcow2|img|raw)"
    r"|\.qcow2(\.zst)?$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class InputFile:
    """Where one catalog entry was found; `precompressed` = the `.zst` is used as is."""

    spec: AssetSpec
    path: Path
    precompressed: bool


@dataclass(frozen=True)
class ReleaseInputs:
    platforms: tuple[tuple[str, str], ...]  # (os, goarch), in HOST_PLATFORMS order
    files: tuple[InputFile, ...]  # one per catalog name, in platform order

    def for_platform(self, os_: str, goarch: str) -> tuple[InputFile, ...]:
        names = {spec.name for spec in catalog.platform_assets(os_, goarch)}
        return tuple(f for f in self.files if f.spec.name in names)


def _check_dirs(dirs: Sequence[Path]) -> tuple[Path, ...]:
    if not dirs:
        raise ConfigError("no input directory given (--input DIR)")
    for d in dirs:
        if not d.is_dir():
            what = "does not exist" if not d.exists() else "is not a directory"
            raise ConfigError(f"input directory {d} {what}")
    return tuple(dirs)


def _usable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.R_OK)


def _find(spec: AssetSpec, dirs: Sequence[Path]) -> InputFile | None:
    for d in dirs:
        raw = d / spec.output_name
        if _usable(raw):
            if spec.compressed and _usable(d / spec.name):
                log.info("using %s, not the %s beside it", raw, spec.name)
            return InputFile(spec, raw, precompressed=False)
        if spec.compressed and _usable(d / spec.name):
            return InputFile(spec, d / spec.name, precompressed=True)
    return None


def default_platforms(dirs: Sequence[Path]) -> tuple[tuple[str, str], ...]:
    """The host platforms whose gvproxy binary was built (is in one of `dirs`)."""
    dirs = _check_dirs(dirs)
    found = tuple(
        (os_, goarch)
        for os_, goarch in catalog.HOST_PLATFORMS
        if any(_usable(d / catalog.gvproxy(os_, goarch).name) for d in dirs)
    )
    if not found:
        expected = ", ".join(catalog.gvproxy(o, a).name for o, a in catalog.HOST_PLATFORMS)
        raise ConfigError(
            f"no gvproxy binary found in {_dirs_text(dirs)} (expected one of: {expected}); "
            "build gvproxy-wrapper, add its directory with --input, or pick platforms "
            "with --platform os/arch"
        )
    return found


def _dirs_text(dirs: Sequence[Path]) -> str:
    return ", ".join(str(d) for d in dirs)


def _known_names() -> set[str]:
    names: set[str] = set()
    for os_, goarch in catalog.HOST_PLATFORMS:
        for spec in catalog.platform_assets(os_, goarch):
            names.update((spec.name, spec.output_name))
    return names


def misnamed_files(dirs: Sequence[Path]) -> list[str]:
    """Files in `dirs` that look like release files but match no catalog name, each
    with the closest catalog name when there is one."""
    known = _known_names()
    out: list[str] = []
    for d in dirs:
        for path in sorted(d.iterdir()):
            name = path.name
            if name in known or not path.is_file() or not _LOOKS_OURS.search(name):
                continue
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
            hint = f" (did you mean {close[0]}?)" if close else ""
            out.append(f"{path}{hint}")
    return out


def find_inputs(
    dirs: Sequence[Path], platforms: Sequence[tuple[str, str]] | None = None
) -> ReleaseInputs:
    """Locate every file the `platforms` need (default: those whose gvproxy was built)."""
    dirs = _check_dirs([Path(d) for d in dirs])
    if platforms is None:
        chosen = default_platforms(dirs)
    else:
        wanted = {catalog.parse_platform(f"{o}/{a}") for o, a in platforms}
        if not wanted:
            raise ConfigError("no platform given")
        chosen = tuple(p for p in catalog.HOST_PLATFORMS if p in wanted)

    files: dict[str, InputFile] = {}
    missing: list[str] = []
    for os_, goarch in chosen:
        for spec in catalog.platform_assets(os_, goarch):
            if spec.name in files or spec.name in missing:
                continue
            found = _find(spec, dirs)
            if found is not None:
                files[spec.name] = found
            elif spec.required:
                missing.append(spec.name)
            else:
                log.info("optional %s not found; published without it", spec.output_name)

    if missing:
        # One line: CI logs and `grep error:` show the whole story.
        missing_text = ", ".join(
            f"{name.removesuffix(catalog.ZST)}[{catalog.ZST}]"
            if name.endswith(catalog.ZST)
            else name
            for name in missing
        )
        platforms_text = ", ".join(f"{o}/{a}" for o, a in chosen)
        message = (
            f"missing {len(missing)} required file(s) for {platforms_text}: {missing_text}; "
            f"searched: {_dirs_text(dirs)}"
        )
        if suspects := misnamed_files(dirs):
            message += f"; likely misnamed: {', '.join(suspects)}"
        raise ConfigError(message)
    for suspect in misnamed_files(dirs):
        log.warning("ignoring %s: matches no catalog name", suspect)
    return ReleaseInputs(chosen, tuple(files.values()))


__all__ = ["InputFile", "ReleaseInputs", "default_platforms", "find_inputs", "misnamed_files"]
