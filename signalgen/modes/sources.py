"""Bar sources by name: the mode decides which one a run reads."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from contextlib import suppress
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import polars as pl

from signalgen.config.models import RunConfig
from signalgen.errors import ConfigError

T = TypeVar("T")


def bar_chunks(cfg: RunConfig, symbol: str, timeframe: str, start: datetime, end: datetime,
               chunk_bars: int) -> Iterator[pl.DataFrame]:
    """Chunks of raw (not yet validated) bars of one symbol with start < bar_time <= end."""
    if cfg.data_source == "synthetic":
        from signalgen.data.synthetic import iter_synthetic_chunks

        return iter_synthetic_chunks(symbol, timeframe, start, end, cfg.seed, chunk_bars)
    if cfg.data_source == "files":
        from signalgen.data.files import FilesSource

        return FilesSource(Path(cfg.root) / cfg.environment.paths.data_dir).iter_chunks(
            symbol, timeframe, start, end, chunk_bars)
    raise ConfigError(f"data source {cfg.data_source!r} cannot feed mode {cfg.mode.name!r}; "
                      "use synthetic or files", file=cfg.files.get("mode"), field="data_source")


def background_priority(increment: int = 10) -> None:
    """Lower the calling thread's CPU priority (Linux nice is per thread), so helper threads use spare
    cores and never starve the thread that runs the models. A no-op where unsupported."""
    tid = threading.get_native_id()
    with suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + increment, 19))


def prefetched(items: Iterator[T], depth: int = 1) -> Iterator[T]:
    """Yield `items` while a thread produces the next ones (polars and numpy release the GIL).

    Errors of the producer are raised in the consumer; a consumer that stops early stops the
    producer at its next item.
    """
    out: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def produce() -> None:
        background_priority()
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        out.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            out.put((end, None))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            out.put((end, exc))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = out.get()
            if item is end:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
