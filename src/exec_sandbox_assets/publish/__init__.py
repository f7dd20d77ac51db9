"""Release-side tooling: turn build outputs into signed OCI artifacts (SPEC.md).

Not on the scheduler's import path: nothing in the client imports this package,
and `oras`/`requests` are imported only when a registry is written to.

    publish(PublishRequest(...)) -> PublishResult
    python -m exec_sandbox_assets.publish --input images/dist --version 0.22.0 \\
        --key release.key --to ghcr.io/dualeai/exec-sandbox-assets
"""

from exec_sandbox_assets.publish.cli import add_arguments, main, run
from exec_sandbox_assets.publish.publisher import (
    PublishRequest,
    PublishResult,
    TargetResult,
    publish,
)
from exec_sandbox_assets.publish.sample import make_sample_inputs

__all__ = [
    "PublishRequest",
    "PublishResult",
    "TargetResult",
    "add_arguments",
    "main",
    "make_sample_inputs",
    "publish",
    "run",
]
