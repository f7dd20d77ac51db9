"""`python -m exec_sandbox_assets.publish`: see `exec_sandbox_assets.cli.publish`."""

from exec_sandbox_assets.cli.publish import main

raise SystemExit(main())
