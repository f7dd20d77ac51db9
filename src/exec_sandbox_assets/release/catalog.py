"""What a release contains: asset names, kinds, languages, arch/os naming (docs/format.md §1).

Pure: no I/O, no settings. Both the publisher and the client derive every file name
and media type from here, so they cannot disagree.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from enum import StrEnum

from exec_sandbox_assets.base.errors import ConfigError, UnknownArchError

ARTIFACT_TYPE = "application/vnd.exec-sandbox.assets.v1"
DEFAULT_REPOSITORY = "ghcr.io/dualeai/exec-sandbox-assets"
GITHUB_OWNER = "dualeai"
GITHUB_REPO = "exec-sandbox"
DEFAULT_RELEASES_URL = f"https://github.com/{GITHUB_OWNER}/{GITHUB_REPO}/releases"

# Layer annotation keys (docs/format.md §4).
ANN_TITLE = "org.opencontainers.image.title"
ANN_VERSION = "org.opencontainers.image.version"
ANN_CREATED = "org.opencontainers.image.created"
ANN_SOURCE = "org.opencontainers.image.source"
ANN_REVISION = "org.opencontainers.image.revision"
ANN_KIND = "dev.exec-sandbox.asset.kind"
ANN_ARCH = "dev.exec-sandbox.asset.arch"
ANN_LANGUAGE = "dev.exec-sandbox.asset.language"
ANN_CONTENT_DIGEST = "dev.exec-sandbox.content.digest"
ANN_CONTENT_SIZE = "dev.exec-sandbox.content.size"
# Optional: the blob's per-chunk SHA-256 digests (release/chunks.py).
ANN_CHUNK_SIZE = "dev.exec-sandbox.chunk.size"
ANN_CHUNK_SHA256 = "dev.exec-sandbox.chunk.sha256"

_TITLE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class Kind(StrEnum):
    KERNEL = "kernel"
    INITRAMFS = "initramfs"
    BASE_IMAGE = "base-image"
    GVPROXY = "gvproxy"


class Language(StrEnum):
    PYTHON = "python"
    JAVASCRIPT = "javascript"
    RAW = "raw"


MEDIA_TYPES: dict[Kind, str] = {
    Kind.KERNEL: "application/vnd.exec-sandbox.kernel.v1+zstd",
    Kind.INITRAMFS: "application/vnd.exec-sandbox.initramfs.v1+zstd",
    Kind.BASE_IMAGE: "application/vnd.exec-sandbox.disk.qcow2.v1+zstd",
    Kind.GVPROXY: "application/vnd.exec-sandbox.gvproxy.v1",
}

ARCHES = ("x86_64", "aarch64")
GOARCH = {"x86_64": "amd64", "aarch64": "arm64"}
ARCH_OF_GOARCH = {v: k for k, v in GOARCH.items()}
OSES = ("linux", "darwin")
# Host platforms the scheduler runs on, in the order the index lists them.
HOST_PLATFORMS: tuple[tuple[str, str], ...] = (
    ("linux", "amd64"),
    ("linux", "arm64"),
    ("darwin", "arm64"),
    ("darwin", "amd64"),
)

_BASE_IMAGE_STEM = {
    Language.PYTHON: "python-3.14-base",
    Language.JAVASCRIPT: "node-1.3-base",
    Language.RAW: "raw-base",
}

# The longest asset name (layer title) a client accepts: the store names lock and temp
# files after an output (with the version, up to 128 characters), and a longer title
# would not fit a 255-byte file name. Real ones are < 40. The one definition of it.
MAX_NAME_LENGTH = 100

ZST = ".zst"


def is_valid_title(name: str) -> bool:
    """True when `name` is a safe single path component (docs/format.md §1)."""
    return bool(_TITLE_RE.fullmatch(name)) and ".." not in name


def check_title(name: str, where: str = "") -> str:
    if not is_valid_title(name):
        src = f" (from {where})" if where else ""
        raise ConfigError(f"refusing asset name {name!r}{src}: must match {_TITLE_RE.pattern}")
    return name


def check_arch(arch: str) -> str:
    if arch not in ARCHES:
        raise UnknownArchError(f"unknown arch {arch!r}: expected one of {', '.join(ARCHES)}")
    return arch


def parse_language(language: str | Language) -> Language:
    try:
        return Language(language)
    except ValueError:
        known = ", ".join(x.value for x in Language)
        raise ConfigError(f"unknown language {language!r}: expected one of {known}") from None


def parse_platform(text: str) -> tuple[str, str]:
    """`linux/amd64` -> ("linux", "amd64"); also accepts `linux/x86_64`."""
    os_, _, arch = text.partition("/")
    arch = GOARCH.get(arch, arch)
    if (os_, arch) not in HOST_PLATFORMS:
        known = ", ".join(f"{o}/{a}" for o, a in HOST_PLATFORMS)
        raise ConfigError(f"unknown platform {text!r}: expected one of {known}")
    return os_, arch


@dataclass(frozen=True)
class AssetSpec:
    """One file of a release, as published (compressed name) and as used (output name)."""

    name: str  # release asset name = OCI layer title, e.g. "vmlinuz-x86_64.zst"
    kind: Kind
    arch: str  # x86_64/aarch64; for gvproxy "{os}-{goarch}"
    language: Language | None = None
    required: bool = True

    @property
    def compressed(self) -> bool:
        return self.name.endswith(ZST)

    @property
    def output_name(self) -> str:
        """The decompressed file name the scheduler reads."""
        return self.name[: -len(ZST)] if self.compressed else self.name

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.kind]


def kernel(arch: str) -> AssetSpec:
    return AssetSpec(f"vmlinuz-{check_arch(arch)}{ZST}", Kind.KERNEL, arch)


def pvh_kernel(arch: str) -> AssetSpec | None:
    """The uncompressed-ELF kernel for PVH direct boot exists for x86_64 only."""
    if check_arch(arch) != "x86_64":
        return None
    return AssetSpec(f"vmlinux-{arch}{ZST}", Kind.KERNEL, arch, required=False)


def kernels(arch: str) -> tuple[AssetSpec, ...]:
    """The kernels of `arch` in boot preference order: on x86_64 the PVH `vmlinux` (direct
    boot, faster) before `vmlinuz`, as exec-sandbox's scheduler and 0.22.0's fetch_kernel."""
    pvh = pvh_kernel(arch)
    return (kernel(arch),) if pvh is None else (pvh, kernel(arch))


def initramfs(arch: str) -> AssetSpec:
    return AssetSpec(f"initramfs-{check_arch(arch)}{ZST}", Kind.INITRAMFS, arch)


def base_image(language: str | Language, arch: str) -> AssetSpec:
    lang = parse_language(language)
    name = f"{_BASE_IMAGE_STEM[lang]}-{check_arch(arch)}.qcow2{ZST}"
    return AssetSpec(name, Kind.BASE_IMAGE, arch, lang)


def gvproxy(os_: str, goarch: str) -> AssetSpec:
    if (os_, goarch) not in HOST_PLATFORMS:
        raise ConfigError(f"no gvproxy build for {os_}/{goarch}")
    return AssetSpec(f"gvproxy-wrapper-{os_}-{goarch}", Kind.GVPROXY, f"{os_}-{goarch}")


def vm_assets(arch: str) -> tuple[AssetSpec, ...]:
    """Kernel(s), initramfs and every base image of one CPU arch."""
    specs = [kernel(arch)]
    if (pvh := pvh_kernel(arch)) is not None:
        specs.append(pvh)
    specs.append(initramfs(arch))
    specs.extend(base_image(lang, arch) for lang in Language)
    return tuple(specs)


def platform_assets(os_: str, goarch: str) -> tuple[AssetSpec, ...]:
    """Everything a host of `os_/goarch` needs (docs/format.md §3)."""
    arch = ARCH_OF_GOARCH[goarch]
    return (*vm_assets(arch), gvproxy(os_, goarch))


def spec_for_name(name: str) -> AssetSpec | None:
    """The catalog entry whose release name or output name is `name`, if any."""
    for os_, goarch in HOST_PLATFORMS:
        for spec in platform_assets(os_, goarch):
            if name in (spec.name, spec.output_name):
                return spec
    return None


def host_os() -> str:
    system = os.uname().sysname.lower()  # os.uname: `platform` costs ms to import
    if system not in OSES:
        raise ConfigError(f"unsupported host OS {system!r}: expected linux or darwin")
    return system


def host_arch() -> str:
    """The host CPU in VM naming (x86_64/aarch64)."""
    machine = os.uname().machine.lower()
    arch = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}
    if machine not in arch:
        raise ConfigError(f"unsupported host CPU {machine!r}: expected x86_64 or aarch64")
    return arch[machine]


def host_platform() -> tuple[str, str]:
    """(os, goarch) of this host, e.g. ("linux", "amd64")."""
    return host_os(), GOARCH[host_arch()]
