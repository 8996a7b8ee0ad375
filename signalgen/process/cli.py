"""Manager commands (start, stop, status, ...): registered on signalgen.cli.app."""
