"""What the `exec-sandbox-assets` process declines to import at start.

Two optional packages are imported by our dependencies merely because they are
installed, and cost a cold command more than anything of ours does before its first
request (2 CPUs, Python 3.11):

- `trio` (~55 ms): httpcore imports it, when installed, to choose trio's locks under a
  trio event loop. This command runs asyncio only.
- `httpx._main` (~45 ms with click, rich and pygments): `httpx/__init__` imports the
  `httpx` console script's module whenever `click` is installed. Nothing here runs it.

A `None` entry in `sys.modules` makes `import NAME` raise ImportError, which both import
sites expect (each falls back to "not installed"). This is done only in the command
line's own process (`cli.app.main()` reading `sys.argv`), never on the library's import
path, where the host program may use trio; a module already imported is left alone.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

#: modules this process never uses but dependencies import when they are installed
UNUSED_MODULES = ("trio", "httpx._main")


def skip_unused_imports(names: Iterable[str] = UNUSED_MODULES) -> None:
    """Make each of `names` not importable in this process, unless already imported."""
    for name in names:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]  # the import system's "absent"


__all__ = ["UNUSED_MODULES", "skip_unused_imports"]
