"""The signature gate: a blob may download before its release's signature verified, but
nothing of it is hashed for install, decompressed or installed before (docs/format.md §7).

The client reads the index, then the signature and the platform manifest together, and
starts the blob downloads as soon as the manifest is there (its digest is bound to the
index, whose signature is still being checked). The installer's reader thread waits on
the gate before it touches the partial; the gate opens with the key ids that verified
the release, or fails with the reason it was refused, which stops the pipeline (the
partial of a refused release is dropped like any other trust failure).
"""

from __future__ import annotations

import threading


class GateClosed(Exception):
    """Raised in a reader thread when the gate failed; `error` is why (raised by the
    caller on the event loop, not in the thread)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class Gate:
    """Opens once; shared by the event loop (`open`/`fail`) and reader threads (`wait`)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._settled = False
        self._error: BaseException | None = None
        self.verified_by: tuple[str, ...] = ()

    @classmethod
    def opened(cls, verified_by: tuple[str, ...] = ()) -> Gate:
        gate = cls()
        gate.open(verified_by)
        return gate

    @property
    def is_open(self) -> bool:
        with self._cond:
            return self._settled and self._error is None

    def open(self, verified_by: tuple[str, ...]) -> None:
        with self._cond:
            if not self._settled:
                self._settled, self.verified_by = True, verified_by
                self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._cond:
            if not self._settled:
                self._settled, self._error = True, error
                self._cond.notify_all()

    def wait(self, cancel: threading.Event, stopped: type[BaseException]) -> None:
        """Block until the gate opens; `GateClosed` when it failed, `stopped` once `cancel`
        is set."""
        with self._cond:
            while not self._settled:
                if cancel.is_set():
                    raise stopped
                self._cond.wait(0.1)
            if self._error is not None:
                raise GateClosed(self._error)


__all__ = ["Gate", "GateClosed"]
