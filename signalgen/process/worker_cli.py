"""Worker-process commands (worker, writer): registered on signalgen.cli.app."""
