"""`python -m exec_sandbox_assets.publish`: see `exec_sandbox_assets.publish.cli`."""

from exec_sandbox_assets.publish.cli import main

raise SystemExit(main())
