"""What a transfer may cost and where it may go: deadlines, a minimum rate, blocked hosts.

`TransferPolicy` is plain data (no httpx here: `config` builds one on the warm path);
`oci.http.HttpCore` enforces it on every request it sends, redirects and token
requests included:

- `deadline`: seconds a metadata read (manifest, index, tag list, signature, small
  blob: retries and body included) and the wait for a blob response's head may take
  in all. A silent or trickling server then costs at most this long before the next
  source is tried, whatever per-operation timeout or retry policy applies.
- `min_rate` over `rate_window`: a blob body must deliver at least
  `min_rate * rate_window` bytes in every `rate_window` seconds spent waiting for it
  (time spent by the consumer, hashing or writing, is not counted). 0 turns it off.
- `blocked_hosts`: host names never connected to, subdomains included, checked before
  each connection (so before any DNS lookup), wherever the request came from: a
  redirect, a token realm. `blocked_reason` says why in the error (the air gap).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_DEADLINE = 30.0
DEFAULT_MIN_RATE = 1024
DEFAULT_RATE_WINDOW = 30.0


@dataclass(frozen=True)
class TransferPolicy:
    deadline: float | None = DEFAULT_DEADLINE
    min_rate: int = DEFAULT_MIN_RATE
    rate_window: float = DEFAULT_RATE_WINDOW
    blocked_hosts: tuple[str, ...] = ()
    blocked_reason: str = "blocked by policy"

    def __post_init__(self) -> None:
        # ValueError, not ConfigError: config validates what users write; this is code.
        if self.deadline is not None and not self.deadline > 0:
            raise ValueError(f"deadline must be positive, got {self.deadline}")
        if self.min_rate < 0 or not self.rate_window > 0:
            raise ValueError("min_rate must be >= 0 and rate_window positive")

    def is_blocked(self, host: str) -> bool:
        return host_matches(host, self.blocked_hosts)


def host_matches(host: str, names: tuple[str, ...]) -> bool:
    """`host` is one of `names` or a subdomain of one (case and a trailing dot ignored)."""
    host = host.lower().rstrip(".")
    return any(host == n or host.endswith("." + n) for n in (n.lower() for n in names))


DEFAULT_POLICY = TransferPolicy()

__all__ = ["DEFAULT_POLICY", "TransferPolicy", "host_matches"]
