"""Release-side tooling: turn build outputs into signed OCI artifacts (docs/format.md).

Not on the scheduler's import path: nothing in the client imports this package,
and `oras`/`requests` are imported only when a registry is written to.

    publish(PublishRequest(...)) -> PublishResult
    python -m exec_sandbox_assets.publish --input images/dist --version 0.22.0 \\
        --key release.key --to ghcr.io/dualeai/exec-sandbox-assets
    python -m exec_sandbox_assets.publish.sample DIR    # a fake build output for demos

Names are loaded on first use, so `python -m exec_sandbox_assets.publish.sample`
does not import the publisher first.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from exec_sandbox_assets.publish.publisher import (
        PublishRequest,
        PublishResult,
        TargetResult,
        publish,
    )
    from exec_sandbox_assets.publish.sample import make_sample_inputs

_WHERE = {
    "PublishRequest": "publisher",
    "PublishResult": "publisher",
    "TargetResult": "publisher",
    "publish": "publisher",
    "make_sample_inputs": "sample",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = [
    "PublishRequest",
    "PublishResult",
    "TargetResult",
    "make_sample_inputs",
    "publish",
]
