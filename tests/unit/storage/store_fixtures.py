"""Functions that run in a child process (module level so `spawn` can import them)."""

from __future__ import annotations

from multiprocessing.queues import Queue
from pathlib import Path


def try_open_store(path: str, results: Queue) -> None:
    """Open the store at `path` and report ("ok", "") or (error class name, message)."""
    from signalgen.storage.duckdb import DuckDBStore

    try:
        with DuckDBStore(Path(path)) as store:
            results.put(("ok", str(store.count("signals"))))
    except Exception as exc:  # noqa: BLE001 - the parent asserts on what arrived
        results.put((type(exc).__name__, str(exc)))


def hold_read_only(path: str, seconds: float, ready: Queue) -> None:
    """Hold the store read-only for `seconds`, as a `signals` reader does for one query."""
    import time

    import duckdb

    con = duckdb.connect(path, read_only=True)
    ready.put("held")
    time.sleep(seconds)
    con.close()
