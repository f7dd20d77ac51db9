"""Where a release is written: a registry, an OCI layout directory, or an archive.

Every target takes the same calls in the same order from the publisher (blobs,
manifests by digest, the index, the signature, then tags), and can read back what
it holds, which is how the publisher reuses `created` and checks its signature.

`open_target` parses the target text: `oci:DIR`, `oci-archive:FILE`, else a
registry reference (`http://127.0.0.1:5000/repo` for plain HTTP, `host/repo` for
HTTPS). The registry target lives in its own module so that `oras` and `requests`
are imported only when a registry is written to.
"""

from __future__ import annotations

import logging
from pathlib import Path

from exec_sandbox_assets.base.errors import ConfigError
from exec_sandbox_assets.oci.layout_target import ArchiveTarget, LayoutTarget
from exec_sandbox_assets.oci.reference import LayoutRef, parse_source_ref
from exec_sandbox_assets.oci.target import PushStats, RegistryOptions, Target

log = logging.getLogger(__name__)


def open_target(text: str, work_dir: Path, options: RegistryOptions | None = None) -> Target:
    """A connected target for `text` (registries are probed and logged in to here)."""
    ref = parse_source_ref(text)
    if isinstance(ref, LayoutRef):
        if ref.tag is not None:
            raise ConfigError(
                f"target {text!r}: give the layout without a tag; the release is tagged vVERSION"
            )
        if ref.kind == "oci-archive":
            return ArchiveTarget(ref.path, work_dir)
        return LayoutTarget(ref.path)
    from exec_sandbox_assets.oci.registry_target import RegistryTarget

    opts = options or RegistryOptions()
    return RegistryTarget.connect(
        text,
        username=opts.username,
        password=opts.password,
        ca_bundle=opts.ca_bundle,
        auth_files=opts.auth_files,
        work_dir=work_dir,
    )


__all__ = [
    "ArchiveTarget",
    "LayoutTarget",
    "PushStats",
    "RegistryOptions",
    "Target",
    "open_target",
]
