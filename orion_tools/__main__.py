"""`python -m orion_tools SUBCOMMAND ...`: see __init__.py."""

import sys

from orion_tools.cli import main

sys.exit(main())
