"""Signal stores (DuckDB locally), and the one rule for reporting a store or output that cannot be written."""

from __future__ import annotations

import re
from pathlib import Path

from signalgen.errors import StorageError

_QUOTED = re.compile(r'"([^"]{1,500})"')


def storage_error(path: Path | str, exc: BaseException) -> StorageError:
    """One line naming the path and the OS reason: `cannot write <path>: <reason>`.

    `exc` is an OSError (its filename and strerror win) or a DuckDB error, whose text names the
    file it failed on in quotes and ends in the OS reason ("...: No space left on device").
    """
    if isinstance(exc, OSError):
        where, reason = exc.filename or path, exc.strerror or type(exc).__name__
    else:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        quoted = _QUOTED.search(text)
        where, reason = (quoted.group(1) if quoted else path), text.rsplit(": ", 1)[-1]
    return StorageError(f"cannot write {where}: {reason[:200]}")
