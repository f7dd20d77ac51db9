"""Trying sources in turn, each failure said once.

A source that fails while a later one may still succeed is logged at INFO as it happens
(no reason: that comes once, later). When a later source then succeeds, one warning per
failed source gives its reason; when none does, there is no warning at all: the error
raised (`ReleaseNotFoundError`, `AllSourcesFailedError`) lists every source with its
reason. So the reason of a failure is printed exactly once either way.
"""

from __future__ import annotations

import logging

from exec_sandbox_assets.base.errors import (
    AllSourcesFailedError,
    AssetDownloadError,
    AssetNotFoundError,
    Attempt,
    ReleaseNotFoundError,
    TransportError,
)

log = logging.getLogger(__name__)


class Failover:
    """The failures met while getting `what` (a release, a file) from one source after
    another."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.attempts: list[Attempt] = []

    def failed(self, source: str, exc: TransportError) -> None:
        self.attempts.append(Attempt(source, str(exc), isinstance(exc, AssetNotFoundError)))
        log.info(
            "%s: %s failed; trying the next source", self.what, source, extra={"source": source}
        )

    def succeeded(self, source: str) -> None:
        """`source` served it: say why each earlier one did not."""
        for attempt in self.attempts:
            log.warning(
                "%s: %s failed (%s); used %s instead",
                self.what,
                attempt.source,
                attempt.error,
                source,
                extra={"source": attempt.source, "error": attempt.error, "used": source},
            )

    def error(self, what: str | None = None) -> AssetDownloadError | ReleaseNotFoundError:
        """Every source failed: the one error naming each with its reason."""
        what = what or self.what
        if self.attempts and all(a.not_found for a in self.attempts):
            return ReleaseNotFoundError(what, self.attempts)
        return AllSourcesFailedError(what, self.attempts)


__all__ = ["Failover"]
