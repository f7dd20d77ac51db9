"""Settings: explicit arguments > environment variables > defaults.

This is the only module that reads the environment, and it does so when a client is
built, never at import time. Every other module takes the `Settings` it needs.

Environment variables (all optional):

| variable | meaning | default |
|---|---|---|
| EXEC_SANDBOX_CACHE_DIR | cache directory | platformdirs user cache dir / exec-sandbox |
| EXEC_SANDBOX_IMAGES_DIR | directory of ready, decompressed assets (trusted as is) | - |
| EXEC_SANDBOX_OFFLINE | `1`: never use the network (local dirs, cache, `oci:` layouts only) | 0 |
| EXEC_SANDBOX_ASSET_VERSION | release to use (`1.2.3`, `v1.2.3` or `latest`) | app version, else latest |
| EXEC_SANDBOX_REGISTRY | default repository | ghcr.io/dualeai/exec-sandbox-assets |
| EXEC_SANDBOX_REGISTRY_MIRRORS | sources tried first, comma-separated: `host/repo`, `http://host:port/repo`, `oci:DIR`, `oci-archive:FILE` | - |
| EXEC_SANDBOX_RELEASES_URL | GitHub Releases download base (`{base}/vV/{name}`) | https://github.com/dualeai/exec-sandbox/releases/download |
| EXEC_SANDBOX_AIRGAP | `1`: never contact the public defaults (ghcr.io repository, GitHub) | 0 |
| EXEC_SANDBOX_TRUSTED_KEYS | PEM public key files, `:`-separated | keys shipped in the package |
| EXEC_SANDBOX_TRUSTED_WORKFLOWS | release workflows trusted to sign keyless (Sigstore), comma-separated `https://github.com/OWNER/REPO/.github/workflows/FILE.yml`, at tags `v<version>` only; empty: none | the exec-sandbox release workflow |
| EXEC_SANDBOX_SIGSTORE_ROOT | Sigstore `trusted_root.json` used instead of the one in the package | the packaged production root |
| EXEC_SANDBOX_SIGNATURE_THRESHOLD | distinct trusted keys and workflows that must sign | 1 |
| EXEC_SANDBOX_INSECURE_SKIP_VERIFY | `1`: accept unsigned content (logged loudly) | 0 |
| EXEC_SANDBOX_ALLOW_DOWNGRADE | `1`: accept a floating tag that moved back in time | 0 |
| EXEC_SANDBOX_CA_BUNDLE | PEM CA bundle for registries with a private CA | system CAs |
| EXEC_SANDBOX_CONCURRENCY | parallel downloads per call | 4 |
| EXEC_SANDBOX_LOCK_TIMEOUT | seconds to wait for another process's download | 1800 |
| EXEC_SANDBOX_SOURCE_TIMEOUT | seconds a metadata read (retries included) or a blob's first answer may take per source | 30 |
| EXEC_SANDBOX_MIN_RATE | bytes/s a blob body must keep up over each 30 s window (`0`: no minimum) | 1024 |
| EXEC_SANDBOX_MIN_FREE | space to leave free on the cache's file system: a download that would eat into it is refused before its first byte (bytes, or with K, M, G, T: `512M`; `0`: only what the files need) | 64M |
| EXEC_SANDBOX_VERIFY_CONTENT_AFTER | opt-in: the boot path hashes a cached file once per process start when its bytes were last checked this long ago (`30d`, `12h`, `90m`, seconds; `0`: at every start); a mismatch is fetched again | - (off: a stat) |
| EXEC_SANDBOX_DISABLE_PROGRESS_BARS | `1`: the CLI draws no progress (as `--no-progress`) | 0 |
| EXEC_SANDBOX_PROGRESS_INTERVAL | seconds between the CLI's progress lines when stderr is not a terminal (CI logs) | 5 |
| EXEC_SANDBOX_ALLOW_LEGACY_RELEASES | `1`: accept exec-sandbox <= 0.22.0 GitHub releases (no signature: TLS + GitHub API digest only) | 0 |
| EXEC_SANDBOX_GITHUB_API_URL | GitHub API base for legacy releases | https://api.github.com |
| GITHUB_TOKEN | token for GitHub API requests (legacy releases only; raises the rate limit) | - |
| DOCKER_CONFIG | directory holding docker's config.json (registry credentials) | ~/.docker |
| REGISTRY_AUTH_FILE | podman/skopeo auth file, read before docker's config.json | - |
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from exec_sandbox_assets.base.errors import ConfigError
from exec_sandbox_assets.oci.policy import DEFAULT_DEADLINE, DEFAULT_MIN_RATE, TransferPolicy
from exec_sandbox_assets.release import catalog
from exec_sandbox_assets.release.version import LATEST as LATEST
from exec_sandbox_assets.release.version import normalize_version as normalize_version
from exec_sandbox_assets.release.workflows import (
    DEFAULT_TRUSTED_WORKFLOW,
    Workflow,
    parse_workflows,
)

ENV_PREFIX = "EXEC_SANDBOX_"
DEFAULT_RELEASES_DOWNLOAD = f"{catalog.DEFAULT_RELEASES_URL}/download"
DEFAULT_GITHUB_API = "https://api.github.com"
# The seed's "images/dist relative to the package root": a checkout's build output.
LOCAL_BUILD_DIR = Path(__file__).resolve().parent.parent.parent / "images" / "dist"
# The gvproxy build output of a checkout; the seed looked here first for dev builds.
GVPROXY_BUILD_DIR = Path(__file__).resolve().parent.parent.parent / "gvproxy-wrapper" / "bin"
PACKAGED_KEYS_DIR = Path(__file__).resolve().parent / "keys"
# What EXEC_SANDBOX_AIRGAP keeps every connection away from, redirects and token realms
# included (subdomains too: objects., release-assets., pkg-containers.githubusercontent.com
# are the CDNs that GitHub Releases and ghcr.io redirect to).
AIRGAP_BLOCKED_HOSTS = ("ghcr.io", "github.com", "githubusercontent.com")
DEFAULT_MIN_FREE = 64 << 20
_NUMBER_AND_UNIT = re.compile(r"(\d+(?:\.\d+)?) ?([A-Za-z]*)")
# 512, 512B, 64M, 64m, 64MB, 64MiB: binary multiples whatever the spelling.
_SIZE_UNITS = {"": 1, "B": 1} | {
    spelling: 1 << (10 * power)
    for power, letter in enumerate("KMGT", start=1)
    for spelling in (letter, letter.lower(), f"{letter}B", f"{letter}iB")
}
_AGE_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
AIRGAP_REASON = "the air gap (EXEC_SANDBOX_AIRGAP=1) allows no connection to GitHub or ghcr.io"
# Seconds between two progress lines of the CLI when stderr is not a terminal.
DEFAULT_PROGRESS_INTERVAL = 5.0


@dataclass(frozen=True)
class Settings:
    cache_dir: Path
    images_dir: Path | None = None
    local_build_dir: Path | None = LOCAL_BUILD_DIR
    gvproxy_build_dir: Path | None = GVPROXY_BUILD_DIR
    offline: bool = False
    version: str = LATEST
    registry: str = catalog.DEFAULT_REPOSITORY
    mirrors: tuple[str, ...] = ()
    releases_url: str = DEFAULT_RELEASES_DOWNLOAD
    airgap: bool = False
    trusted_keys: tuple[Path, ...] = ()
    # Keyless trust: release workflows (URLs) and the Sigstore root (None: the packaged one).
    trusted_workflows: tuple[str, ...] = (DEFAULT_TRUSTED_WORKFLOW,)
    sigstore_root: Path | None = None
    threshold: int = 1
    insecure_skip_verify: bool = False
    allow_downgrade: bool = False
    ca_bundle: Path | None = None
    docker_config: Path | None = None
    concurrency: int = 4
    lock_timeout: float = 1800.0
    source_timeout: float = DEFAULT_DEADLINE
    min_rate: int = DEFAULT_MIN_RATE
    min_free: int = DEFAULT_MIN_FREE
    verify_content_after: float | None = None  # seconds; None: the warm path hashes nothing
    progress_bars: bool = True
    progress_interval: float = DEFAULT_PROGRESS_INTERVAL  # seconds, lines off a terminal
    # (host, username, password) given on the command line: used before any auth file.
    registry_credentials: tuple[tuple[str, str, str], ...] = field(default=(), repr=False)
    # Where exec-sandbox <= 0.22.0 left decompressed files (adopted by hash, docs/compat.md).
    legacy_dirs: tuple[Path, ...] = ()
    allow_legacy_releases: bool = False
    github_api_url: str = DEFAULT_GITHUB_API
    github_token: str | None = field(default=None, repr=False)
    host_os: str = field(default_factory=catalog.host_os)
    host_goarch: str = field(default_factory=lambda: catalog.host_platform()[1])

    @property
    def floating(self) -> bool:
        return self.version == LATEST

    @property
    def tag(self) -> str:
        return LATEST if self.floating else f"v{self.version}"

    @property
    def workflows(self) -> tuple[Workflow, ...]:
        return tuple(Workflow.parse(w) for w in self.trusted_workflows)

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    def transfer_policy(self) -> TransferPolicy:
        """What every HTTP source built from these settings is held to (see oci.policy)."""
        return TransferPolicy(
            deadline=self.source_timeout,
            min_rate=self.min_rate,
            blocked_hosts=AIRGAP_BLOCKED_HOSTS if self.airgap else (),
            blocked_reason=AIRGAP_REASON,
        )


def _flag(env: Mapping[str, str], name: str) -> bool:
    value = env.get(ENV_PREFIX + name, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{ENV_PREFIX}{name}={value!r}: expected 1 or 0")


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(ENV_PREFIX + name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{ENV_PREFIX}{name}={raw!r}: expected a whole number") from None
    if value < minimum:
        raise ConfigError(f"{ENV_PREFIX}{name}={raw!r}: must be at least {minimum}")
    return value


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a number of seconds") from None
    if not 0 < value < 1e9:  # NaN fails this too
        raise ConfigError(f"{name}={raw!r}: must be a positive number of seconds")
    return value


def _number_with_unit(
    env: Mapping[str, str], name: str, units: Mapping[str, int], expected: str
) -> float | None:
    """`12`, `1.5G`, `30d`: the number times the factor of its unit in `units`; None
    when unset."""
    raw = env.get(name, "").strip()
    if not raw:
        return None
    match = _NUMBER_AND_UNIT.fullmatch(raw)
    factor = units.get(match.group(2)) if match else None
    if match is None or factor is None:
        raise ConfigError(f"{name}={raw!r}: expected {expected}")
    return float(match.group(1)) * factor


def _size(env: Mapping[str, str], name: str, default: int) -> int:
    value = _number_with_unit(env, name, _SIZE_UNITS, "a size in bytes, or with K, M, G, T")
    return default if value is None else int(value)


def _age(env: Mapping[str, str], name: str) -> float | None:
    return _number_with_unit(env, name, _AGE_UNITS, "an age: seconds, or with s, m, h, d, w")


def _path(env: Mapping[str, str], name: str) -> Path | None:
    raw = env.get(name, "").strip()
    return Path(raw).expanduser() if raw else None


def _workflows(env: Mapping[str, str]) -> tuple[str, ...]:
    """EXEC_SANDBOX_TRUSTED_WORKFLOWS: unset means the default; set and empty, none."""
    name = ENV_PREFIX + "TRUSTED_WORKFLOWS"
    if name not in env:
        return (DEFAULT_TRUSTED_WORKFLOW,)
    return tuple(w.url for w in parse_workflows(env[name], name))


def docker_config_path(env: Mapping[str, str] | None = None) -> Path:
    """docker's config.json: `$DOCKER_CONFIG/config.json`, else ~/.docker/config.json."""
    env = os.environ if env is None else env
    base = _path(env, "DOCKER_CONFIG")
    return base / "config.json" if base else Path.home() / ".docker" / "config.json"


def progress_bars_enabled(env: Mapping[str, str] | None = None) -> bool:
    """False when EXEC_SANDBOX_DISABLE_PROGRESS_BARS=1 (as HF_HUB_DISABLE_PROGRESS_BARS)."""
    env = os.environ if env is None else env
    return not _flag(env, "DISABLE_PROGRESS_BARS")


def progress_interval(env: Mapping[str, str] | None = None) -> float:
    """EXEC_SANDBOX_PROGRESS_INTERVAL: seconds between progress lines off a terminal."""
    env = os.environ if env is None else env
    return _seconds(env, ENV_PREFIX + "PROGRESS_INTERVAL", DEFAULT_PROGRESS_INTERVAL)


def auth_files(docker_config: Path | None, env: Mapping[str, str] | None = None) -> list[Path]:
    """Registry auth files, in the order they are searched: $REGISTRY_AUTH_FILE, docker's
    config.json (`docker_config`), then podman's $XDG_RUNTIME_DIR/containers/auth.json and
    $XDG_CONFIG_HOME/containers/auth.json (~/.config). `docker_config=None`: none at all."""
    if docker_config is None:
        return []
    env = os.environ if env is None else env
    files = [_path(env, "REGISTRY_AUTH_FILE"), docker_config]
    runtime = _path(env, "XDG_RUNTIME_DIR")
    if runtime is not None:
        files.append(runtime / "containers" / "auth.json")
    config_home = _path(env, "XDG_CONFIG_HOME") or Path.home() / ".config"
    files.append(config_home / "containers" / "auth.json")
    return list(dict.fromkeys(f for f in files if f is not None))


def default_cache_dir() -> Path:
    import platformdirs  # only when no cache dir was given: keeps the warm path lean

    return Path(platformdirs.user_cache_dir("exec-sandbox"))


def packaged_keys() -> tuple[Path, ...]:
    """Release public keys shipped inside the package (keys/*.pub)."""
    if not PACKAGED_KEYS_DIR.is_dir():
        return ()
    return tuple(sorted(PACKAGED_KEYS_DIR.glob("*.pub")))


def legacy_dirs(
    cache_dir: Path, env_cache_dir: Path | None, app_version: str | None
) -> tuple[Path, ...]:
    """Where exec-sandbox 0.22.0 kept its files: flat in EXEC_SANDBOX_CACHE_DIR when that is
    set, else `v{app version}` under the default cache dir (our version dir for that release)."""
    if env_cache_dir is not None:
        return (env_cache_dir,)
    if app_version:
        return (cache_dir / f"v{app_version}",)
    return ()


def load_settings(env: Mapping[str, str] | None = None, **explicit: Any) -> Settings:
    """Build settings from explicit arguments (None = not given), the environment, defaults.

    `app_version` (the embedding application's version) is used when neither an explicit
    `version` nor EXEC_SANDBOX_ASSET_VERSION is set; a `.dev` app version means `latest`.
    """
    env = os.environ if env is None else env
    given = {k: v for k, v in explicit.items() if v is not None}
    app_version = given.pop("app_version", None)

    version_text = given.pop("version", None) or env.get(ENV_PREFIX + "ASSET_VERSION", "")
    if not version_text.strip() and app_version and ".dev" not in app_version:
        version_text = app_version
    mirrors_raw = env.get(ENV_PREFIX + "REGISTRY_MIRRORS", "")
    keys_raw = env.get(ENV_PREFIX + "TRUSTED_KEYS", "")

    env_cache_dir = _path(env, ENV_PREFIX + "CACHE_DIR")
    values: dict[str, Any] = {
        "cache_dir": env_cache_dir,
        "images_dir": _path(env, ENV_PREFIX + "IMAGES_DIR"),
        "offline": _flag(env, "OFFLINE"),
        "version": normalize_version(version_text),
        "registry": env.get(ENV_PREFIX + "REGISTRY", "").strip() or catalog.DEFAULT_REPOSITORY,
        "mirrors": tuple(m.strip() for m in mirrors_raw.replace("\n", ",").split(",") if m.strip()),
        "releases_url": env.get(ENV_PREFIX + "RELEASES_URL", "").strip().rstrip("/")
        or DEFAULT_RELEASES_DOWNLOAD,
        "airgap": _flag(env, "AIRGAP"),
        "trusted_keys": tuple(Path(p).expanduser() for p in keys_raw.split(":") if p.strip())
        or packaged_keys(),
        "trusted_workflows": _workflows(env),
        "sigstore_root": _path(env, ENV_PREFIX + "SIGSTORE_ROOT"),
        "threshold": _int(env, "SIGNATURE_THRESHOLD", 1),
        "insecure_skip_verify": _flag(env, "INSECURE_SKIP_VERIFY"),
        "allow_downgrade": _flag(env, "ALLOW_DOWNGRADE"),
        "ca_bundle": _path(env, ENV_PREFIX + "CA_BUNDLE"),
        "docker_config": docker_config_path(env),
        "concurrency": _int(env, "CONCURRENCY", 4),
        "lock_timeout": float(_int(env, "LOCK_TIMEOUT", 1800, minimum=0)),
        "source_timeout": _seconds(env, ENV_PREFIX + "SOURCE_TIMEOUT", DEFAULT_DEADLINE),
        "min_rate": _int(env, "MIN_RATE", DEFAULT_MIN_RATE, minimum=0),
        "min_free": _size(env, ENV_PREFIX + "MIN_FREE", DEFAULT_MIN_FREE),
        "verify_content_after": _age(env, ENV_PREFIX + "VERIFY_CONTENT_AFTER"),
        "progress_bars": progress_bars_enabled(env),
        "progress_interval": progress_interval(env),
        "allow_legacy_releases": _flag(env, "ALLOW_LEGACY_RELEASES"),
        "github_api_url": env.get(ENV_PREFIX + "GITHUB_API_URL", "").strip().rstrip("/")
        or DEFAULT_GITHUB_API,
        "github_token": env.get("GITHUB_TOKEN", "").strip() or None,
    }
    if "trusted_keys" in given:
        given["trusted_keys"] = tuple(Path(p) for p in given["trusted_keys"])
    if "trusted_workflows" in given:
        workflows = given["trusted_workflows"]
        text = workflows if isinstance(workflows, str) else ",".join(workflows)
        given["trusted_workflows"] = tuple(w.url for w in parse_workflows(text, "trusted workflow"))
    for key in (
        "cache_dir",
        "images_dir",
        "ca_bundle",
        "sigstore_root",
        "docker_config",
        "local_build_dir",
        "gvproxy_build_dir",
    ):
        if key in given:
            given[key] = Path(given[key]).expanduser()
    values.update(given)
    if values["cache_dir"] is None:
        values["cache_dir"] = default_cache_dir()
    if "legacy_dirs" in given:
        values["legacy_dirs"] = tuple(Path(p).expanduser() for p in given["legacy_dirs"])
    else:
        values["legacy_dirs"] = legacy_dirs(values["cache_dir"], env_cache_dir, app_version)
    unknown = set(values) - set(Settings.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    return Settings(**values)
