"""The `exec-sandbox-assets` command: one module per command, `app` for the parser and
the command table. Nothing here is on the scheduler's import path."""

from exec_sandbox_assets.cli.app import main

__all__ = ["main"]
