"""Where a release can come from: registries, OCI layouts and archives, GitHub Releases.

`build_sources` turns settings into the ordered list of sources; `open_source` turns one
parsed reference into its source. Each source kind lives in its own module; `base.Source`
is the one place that caps sizes and checks digests.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from exec_sandbox_assets.base.safetext import redact_url
from exec_sandbox_assets.config import Settings
from exec_sandbox_assets.sources.base import BlobOpener, Source
from exec_sandbox_assets.sources.layout import LayoutSource
from exec_sandbox_assets.sources.registry import RegistrySource
from exec_sandbox_assets.sources.releases import ReleasesSource, latest_download_url

if TYPE_CHECKING:
    from exec_sandbox_assets.oci.auth import Credentials
    from exec_sandbox_assets.oci.policy import TransferPolicy
    from exec_sandbox_assets.oci.reference import LayoutRef, RegistryRef

log = logging.getLogger(__name__)


__all__ = [
    "BlobOpener",
    "LayoutSource",
    "RegistrySource",
    "ReleasesSource",
    "Source",
    "build_sources",
    "latest_download_url",
    "open_source",
]


def open_source(
    text: str,
    ref: RegistryRef | LayoutRef,
    *,
    docker_config: Path | None,
    ca_bundle: Path | None,
    credentials: Credentials | None = None,
    policy: TransferPolicy,
) -> Source:
    """The source one parsed reference names: a layout on this machine, or a repository
    on a registry (credentials as given, else as docker finds them for its host:
    `oci.credentials`). `policy` (deadlines, the air gap) is required: a caller that
    forgot it would silently bypass the air gap."""
    from exec_sandbox_assets.config import auth_files
    from exec_sandbox_assets.oci.credentials import find_credentials
    from exec_sandbox_assets.oci.reference import LayoutRef
    from exec_sandbox_assets.oci.registry import RegistryClient

    if isinstance(ref, LayoutRef):
        return LayoutSource(ref.path, ref.kind == "oci-archive", text)
    if credentials is None:
        credentials = find_credentials(ref.host, auth_files(docker_config))
    client = RegistryClient(ref, credentials=credentials, ca_bundle=ca_bundle, policy=policy)
    return RegistrySource(client, text)


def build_sources(settings: Settings) -> list[Source]:
    """The remote steps of docs/format.md §7, in order: mirrors, then the default
    repository, then GitHub Releases.

    Offline keeps only `oci:`/`oci-archive:` layouts (they are on this machine).
    Air-gapped (`EXEC_SANDBOX_AIRGAP=1`) never contacts the public defaults: every
    registry source on ghcr.io and every releases base on github.com is dropped, the
    default repository and the default releases base included, whoever configured them.
    """
    from exec_sandbox_assets.oci.http import HttpCore
    from exec_sandbox_assets.oci.reference import LayoutRef, parse_source_ref

    entries = [*settings.mirrors, settings.registry]
    # Deadlines, the minimum rate and the air gap hold on every connection, redirects too.
    policy = settings.transfer_policy()
    sources: list[Source] = []
    for text in dict.fromkeys(entries):  # ordered, without duplicates
        ref = parse_source_ref(text)
        if not isinstance(ref, LayoutRef) and settings.offline:
            continue
        if not isinstance(ref, LayoutRef) and (
            settings.airgap and _is_public_host(ref.host, _PUBLIC_REGISTRY_HOSTS)
        ):
            log.info("air-gapped: not using %s", redact_url(text))
            continue
        sources.append(
            open_source(
                text,
                ref,
                docker_config=settings.docker_config,
                ca_bundle=settings.ca_bundle,
                credentials=_given_credentials(settings, ref),
                policy=policy,
            )
        )
    releases = settings.releases_url
    if settings.offline or not releases:
        pass
    elif settings.airgap and _is_public_host(_url_host(releases), _PUBLIC_RELEASE_HOSTS):
        log.info("air-gapped: not using %s", redact_url(releases))
    else:
        http = HttpCore(peer="release server", ca_bundle=settings.ca_bundle, policy=policy)
        sources.append(ReleasesSource(http, releases, settings.tag))
    return sources


def _given_credentials(settings: Settings, ref: RegistryRef | LayoutRef) -> Credentials | None:
    """Credentials given explicitly (the CLI's --username) for this source's host."""
    from exec_sandbox_assets.oci.credentials import given_credentials

    host = getattr(ref, "host", "")
    return given_credentials(host, settings.registry_credentials) if host else None


# What EXEC_SANDBOX_AIRGAP keeps the client away from (subdomains included).
_PUBLIC_REGISTRY_HOSTS = ("ghcr.io",)
_PUBLIC_RELEASE_HOSTS = ("github.com", "githubusercontent.com")


def _url_host(url: str) -> str:
    from urllib.parse import urlsplit

    return (urlsplit(url).hostname or "").lower()


def _is_public_host(host: str, publics: tuple[str, ...]) -> bool:
    name = host.lower().rsplit(":", 1)[0] if host.count(":") == 1 else host.lower()
    return any(name == p or name.endswith(f".{p}") for p in publics)
