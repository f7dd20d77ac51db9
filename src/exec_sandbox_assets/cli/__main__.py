import sys

from exec_sandbox_assets.cli.app import main

sys.exit(main())
