"""Errors grouped by what the operator must do (see ARCHITECTURE.md, "Errors").

The CLI maps them to exit codes in one place (`signalgen.cli`).
"""

from __future__ import annotations


class SignalgenError(Exception):
    """Root of every error signalgen raises on purpose."""

    exit_code = 1


class ConfigError(SignalgenError):
    """A configuration problem: fatal, never restarted, exit code 2.

    The message names the file, the line where known, and the dotted field path.
    """

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.file, self.line, self.field = file, line, field
        where = ""
        if file:
            where = f"{file}:{line}" if line else file
        if field:
            where = f"{where}: {field}" if where else field
        super().__init__(f"{where}: {message}" if where else message)


class DataError(SignalgenError):
    """Bad market data: the record is rejected and counted; the worker goes on."""


class TransientError(SignalgenError):
    """Network or sink unavailable: back off and retry."""

    exit_code = 75  # EX_TEMPFAIL


class StorageError(SignalgenError):
    """A store or output cannot be written (read-only folder, disk full, corrupt file).

    The message is one line naming the path; the run is recorded as failed and stops.
    """


class RunStopped(SignalgenError):
    """The run was asked to stop (SIGINT / SIGTERM): work done so far is flushed, the run is
    recorded as `stopped`. Exit code 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int, message: str) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(message)
