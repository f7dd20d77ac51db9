"""Our errors as exec-sandbox's own classes, for code written against exec-sandbox 0.22.0.

exec-sandbox and its users catch `exec_sandbox.SandboxError` and the asset errors of
`exec_sandbox.exceptions`; its `sbx` maps `SandboxError` to exit 125. `translate` picks
the class 0.22.0 raises (or documents) for the same failure:

    AssetsNotFoundLocally (offline / download disabled)  AssetNotFoundError + FileNotFoundError
    AllSourcesFailedError, every source "not found"    AssetNotFoundError
    AssetNotFoundError (404; UnknownArchError too)     AssetNotFoundError
    other transport errors, OutOfSpaceError, FormatError  AssetDownloadError
    TrustError (digest, signature, version, rollback, size)  AssetChecksumError
    ConfigError and anything else                      AssetError

The original stays attached as `__cause__` (the caller raises `... from` it) and as
`context["cause"]`. Without exec-sandbox installed, errors pass through unchanged (ours
keep the names AssetNotFoundError, AssetDownloadError, AssetChecksumError).

Imported lazily at raise time only, so there is no import cycle: exec-sandbox imports
its assets module (this package) while it is itself being imported.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Coroutine
from types import ModuleType
from typing import Any, ParamSpec, TypeVar

from exec_sandbox_assets.base.errors import (
    AllSourcesFailedError,
    AssetError,
    AssetNotFoundError,
    AssetsNotFoundLocally,
    FormatError,
    OutOfSpaceError,
    ReleaseNotFoundError,
    TransportError,
    TrustError,
)

APP_EXCEPTIONS = "exec_sandbox.exceptions"

_P = ParamSpec("_P")
_T = TypeVar("_T")


def _exceptions() -> ModuleType | None:
    try:
        return importlib.import_module(APP_EXCEPTIONS)
    except ImportError:
        return None


@functools.cache
def _missing_locally_class(base: type[Exception]) -> type[Exception]:
    """exec-sandbox's AssetNotFoundError that is also a FileNotFoundError: 0.22.0 raises the
    former offline, its docstrings promise the latter; callers may catch either."""
    return type("AssetNotFoundLocallyError", (base, FileNotFoundError), {"__module__": __name__})


def _class_name(exc: AssetError) -> str:
    if isinstance(exc, AllSourcesFailedError):
        return "AssetNotFoundError" if exc.not_found else "AssetDownloadError"
    if isinstance(exc, AssetNotFoundError):
        return "AssetNotFoundError"
    if isinstance(exc, TransportError | OutOfSpaceError | FormatError):
        return "AssetDownloadError"
    if isinstance(exc, TrustError):
        return "AssetChecksumError"
    return "AssetError"


def translate(exc: AssetError) -> BaseException:
    """exec-sandbox's exception for `exc` (or `exc` itself without exec-sandbox)."""
    module = _exceptions()
    if module is None:
        return exc
    context = {"cause": type(exc).__name__}
    if isinstance(exc, AllSourcesFailedError | ReleaseNotFoundError):
        context["tried"] = "; ".join(f"{a.source}: {a.error}" for a in exc.attempts)
    if isinstance(exc, AssetsNotFoundLocally):
        cls: Callable[..., BaseException] = _missing_locally_class(module.AssetNotFoundError)
        context["searched"] = ", ".join(exc.searched)
    else:
        cls = getattr(module, _class_name(exc))
    return cls(str(exc), context=context)


def translating(
    fn: Callable[_P, Coroutine[Any, Any, _T]],
) -> Callable[_P, Coroutine[Any, Any, _T]]:
    """Raise exec-sandbox's class for each of our errors, `from` the original (the edge)."""

    @functools.wraps(fn)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await fn(*args, **kwargs)
        except AssetError as exc:
            translated = translate(exc)
            if translated is exc:
                raise
            raise translated from exc

    return wrapper


__all__ = ["translate", "translating"]
