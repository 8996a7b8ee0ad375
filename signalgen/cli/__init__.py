"""The command line: `python strategy_runner.py <command>`.

Commands stay thin: parse, load config, call one function, print. Errors map to exit codes in
`main()` only: ConfigError -> 2, other SignalgenError -> its exit_code; no tracebacks.

`app.py` holds the typer app, the options every command shares and the config loading; each other
module adds its commands to that app when it is imported here: `commands` (run, config, data, models,
signals, runs), `fleet` (start, stop, status, ...), `streams` (feed, consume, clients, recorder),
`deploy` (supervisord) and `worker` (the worker and writer processes).
"""

from __future__ import annotations

import os
import sys

from rich.markup import escape

from signalgen.cli import commands, streams, fleet, deploy, kubernetes, worker  # noqa: F401,I001  (they add their commands, in this order)
from signalgen.cli.app import app, err_console
from signalgen.errors import SignalgenError

def main(argv: list[str] | None = None) -> int:
    """Entry point; the one place errors become exit codes.

    Usage errors are typer's (exit 2 with usage). Our errors print one line, no traceback:
    ConfigError -> 2, TransientError -> 75, any other SignalgenError -> 1.
    """
    os.umask(0o077)  # until an environment says otherwise (`paths.umask`): tenants' signals are private
    try:
        app(args=argv)  # standalone: raises SystemExit with typer's own exit code
    except SignalgenError as exc:
        # soft_wrap: one line per message line, however narrow the terminal (grep, log collectors)
        err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
