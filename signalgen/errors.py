"""Errors grouped by what the operator must do (see ARCHITECTURE.md, "Errors").

The CLI maps them to exit codes in one place (`signalgen.cli`).
"""

from __future__ import annotations

import errno
import re
from pathlib import Path


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


_TRANSIENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# how a full disk reads in the messages of libraries that do not keep the OSError (DuckDB, SQLite)
_TRANSIENT_TEXT = ("No space left on device", "Disk quota exceeded", "database or disk is full")


def is_transient(exc: BaseException | None) -> bool:
    """True for a failure that resolves itself and is waited out, never counted as a crash: a
    TransientError, or a full disk or quota, found in the error, its causes, or their messages."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, TransientError):
            return True
        if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
            return True
        if any(text in str(exc) for text in _TRANSIENT_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


_QUOTED = re.compile(r'"([^"]{1,500})"')


def storage_error(path: Path | str, exc: BaseException) -> StorageError:
    """One line naming the path and the reason: `cannot write <path>: <reason>`.

    `exc` is an OSError (its filename and strerror win); an error of a library that keeps no errno
    (DuckDB, polars writing to a file object), whose text names the file it failed on in quotes and
    ends in the OS reason ("...: No space left on device"); or any other error (a cloud API's, with
    its own message: `message` where it has one), whose first line is the reason and `path` where.
    """
    if isinstance(exc, OSError) and exc.strerror:
        where, reason = exc.filename or path, exc.strerror
    else:
        text = (getattr(exc, "message", None) or str(exc)).strip()
        text = text.splitlines()[0] if text else type(exc).__name__
        quoted = _QUOTED.search(text)
        if quoted or isinstance(exc, OSError):
            where, reason = (quoted.group(1) if quoted else path), text.rsplit(": ", 1)[-1]
        else:
            where, reason = path, text
    return StorageError(f"cannot write {where}: {reason[:200]}")
