"""Byte counts in messages: `1.5 MiB (1572864 bytes)`, readable and exact."""

from __future__ import annotations


def describe_size(n: int) -> str:
    """1572864 -> '1.5 MiB (1572864 bytes)'; below 1 KiB just the bytes."""
    if n < 1024:
        return f"{n} bytes"
    value, units = n / 1024, ["KiB", "MiB", "GiB", "TiB"]
    while value >= 1024 and len(units) > 1:
        value /= 1024
        units.pop(0)
    return f"{value:.1f} {units[0]} ({n} bytes)"


__all__ = ["describe_size"]
