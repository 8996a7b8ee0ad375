"""Stream commands (feed, consume, clients grant, recorder): registered on signalgen.cli.app."""
