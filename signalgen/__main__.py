"""`python -m signalgen <command>`: the CLI, as strategy_runner.py runs it."""

import sys

from signalgen.cli import main

sys.exit(main())
