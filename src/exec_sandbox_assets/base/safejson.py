"""The one parser of untrusted JSON: size cap, nesting cap, and every failure a FormatError.

`json.loads` on hostile bytes can raise more than `JSONDecodeError`: a number of more
than 4,300 digits is a plain `ValueError` (CPython's int-conversion limit), deep nesting
a `RecursionError`, invalid UTF-8 a `UnicodeDecodeError`. Every document a server, a
mirror, a layout or an archive hands us goes through `loads` instead, which turns all
of them into `FormatError` naming the source, and also refuses what JSON does not allow
or what would only make trouble later:

- documents over `max_size` bytes (before parsing);
- nesting deeper than `max_depth` (no OCI document we read nests past 6);
- duplicate object keys (two parsers could pick different values: a classic way to
  make a signed document say two things);
- `NaN`, `Infinity` and numbers that overflow a float (not JSON; `inf` sizes or TTLs);
- lone surrogates in strings (`"\\ud800"`: valid JSON escapes, but unencodable text
  that would fail later, far from the parser).

Standard library only: the scheduler's warm path may import this.
"""

from __future__ import annotations

import json
import math
from typing import Any

from exec_sandbox_assets.base.errors import FormatError
from exec_sandbox_assets.base.safetext import clean_text

# The largest document we parse whole (the distribution registry's manifest limit).
MAX_JSON_SIZE = 4 * 1024 * 1024
MAX_DEPTH = 32


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]!r} is out of range")
    return value


def _check_tree(doc: Any, max_depth: int) -> None:
    """Depth cap and encodable strings, iteratively (the tree may be deep)."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("a string holds a lone surrogate escape") from None
        elif isinstance(node, dict | list):
            if depth > max_depth:
                raise ValueError(f"nested deeper than {max_depth} levels")
            if isinstance(node, dict):
                stack.extend((key, depth) for key in node)
                stack.extend((value, depth + 1) for value in node.values())
            else:
                stack.extend((item, depth + 1) for item in node)


def loads(
    data: bytes | str,
    where: str,
    *,
    what: str = "document",
    max_size: int = MAX_JSON_SIZE,
    max_depth: int = MAX_DEPTH,
) -> Any:
    """Parse untrusted JSON. Every failure is a FormatError naming `where` (shown as
    given: callers pass a display-safe source, see safetext.redact_url)."""
    if len(data) > max_size:
        raise FormatError(f"{what} of {len(data)} bytes exceeds the limit of {max_size}", where)
    try:
        doc = json.loads(
            data, object_pairs_hook=_unique, parse_constant=_constant, parse_float=_finite
        )
        _check_tree(doc, max_depth)
    except RecursionError:
        raise FormatError(f"{what} is not valid JSON: nested too deeply", where) from None
    except (ValueError, TypeError) as exc:  # JSONDecodeError, UnicodeDecodeError included
        reason = clean_text(str(exc).split("; use sys.set_int_max_str_digits")[0], 200)
        raise FormatError(f"{what} is not valid JSON: {reason}", where) from None
    return doc


def loads_object(
    data: bytes | str,
    where: str,
    *,
    what: str = "document",
    max_size: int = MAX_JSON_SIZE,
    max_depth: int = MAX_DEPTH,
) -> dict[str, Any]:
    """`loads`, and the document must be a JSON object."""
    doc = loads(data, where, what=what, max_size=max_size, max_depth=max_depth)
    if not isinstance(doc, dict):
        raise FormatError(f"{what}: expected a JSON object", where)
    return doc


__all__ = ["MAX_DEPTH", "MAX_JSON_SIZE", "loads", "loads_object"]
