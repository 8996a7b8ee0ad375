#!/usr/bin/env python
"""signalgen entry point: `python strategy_runner.py --help`."""

import sys

from signalgen.cli import main

if __name__ == "__main__":
    sys.exit(main())
