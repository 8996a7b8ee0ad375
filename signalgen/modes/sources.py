"""Bar sources by name: the mode decides which one a run reads."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import polars as pl

from signalgen.threads import background_priority
from signalgen.config.models import RunConfig, timeframe_delta
from signalgen.config.workers import WorkerSpec
from signalgen.data.validation import ValidatedBars, validate_bars, validate_chunks
from signalgen.data.schema import BAR_SCHEMA
from signalgen.errors import ConfigError

T = TypeVar("T")


def bar_chunks(cfg: RunConfig, symbol: str, timeframe: str, chunk_bars: int, *,
               history: int) -> Iterator[pl.DataFrame]:
    """Raw (not yet validated) bars of one symbol: first ONE frame of history, then chunks of the
    run's range (cfg.start, cfg.end].

    The history frame holds bars at or before cfg.start, enough that its last `history` valid bars
    exist however far back they lie (files: every earlier bar; the caller validates and keeps the
    tail). History is counted in bars, not time: a run starting right after a data gap still gets
    the context a run from an earlier start has.
    """
    if cfg.data_source == "synthetic":
        from signalgen.data.synthetic import iter_synthetic_chunks

        # one fixed series whatever the range (bars on the epoch's grid, no gaps: the `history` bars
        # before cfg.start are exactly those in (origin, cfg.start])
        origin = cfg.start - history * timeframe_delta(timeframe)
        yield from _cut_at(iter_synthetic_chunks(symbol, timeframe, origin, cfg.end, cfg.seed, chunk_bars),
                           cfg.start)
    elif cfg.data_source == "files":
        from signalgen.data.files import FilesSource

        files = FilesSource(Path(cfg.root) / cfg.environment.paths.data_dir)
        yield files.load(symbol, timeframe, None, cfg.start)
        yield from files.iter_chunks(symbol, timeframe, cfg.start, cfg.end, chunk_bars)
    else:
        raise ConfigError(f"data source {cfg.data_source!r} cannot feed mode {cfg.mode.name!r}; "
                          "use synthetic or files", file=cfg.files.get("mode"), field="data_source")


def data_files(cfg: RunConfig, specs: Iterable[WorkerSpec]) -> dict[str, str] | None:
    """What a run's bars are read from, for its record: on the files source, the sha256 of every file
    its workers read, by path under the data folder (hashed when the run starts); otherwise None
    (synthetic bars are a function of the seed; a stream keeps no history to hash)."""
    if cfg.data_source != "files":
        return None
    from signalgen.data.files import FilesSource

    files = FilesSource(Path(cfg.root) / cfg.environment.paths.data_dir)
    return {name: digest for series in sorted({(s.symbol, s.timeframe) for s in specs})
            for name, digest in files.digests(*series).items()}


def chunk_feed(cfg: RunConfig, spec: WorkerSpec, chunk_bars: int | None = None) -> Iterator[ValidatedBars]:
    """A worker's bars for `run_worker` in validated chunks (historical, mock): first the history —
    the last `history_bars(spec)` valid bars at or before cfg.start, context only — then the range."""
    from signalgen.config.workers import history_bars

    need = history_bars(spec)
    chunks = validate_chunks(bar_chunks(cfg, spec.symbol, spec.timeframe, chunk_bars or cfg.mode.chunk_bars,
                                        history=need), spec.timeframe)
    first = next(chunks)
    yield ValidatedBars(first.bars.tail(need), first.rejections, first.counts)
    yield from chunks


def per_bar_feed(cfg: RunConfig, spec: WorkerSpec) -> Iterator[dict]:
    """A worker's bars for `run_worker` one at a time (simulation, streaming): the valid history bars,
    then every raw bar of the range (run_worker validates them bar by bar)."""
    from signalgen.config.workers import history_bars

    need = history_bars(spec)
    frames = bar_chunks(cfg, spec.symbol, spec.timeframe, cfg.mode.chunk_bars, history=need)
    yield from validate_bars(next(frames), spec.timeframe).bars.tail(need).iter_rows(named=True)
    for frame in frames:
        yield from frame.iter_rows(named=True)


def _cut_at(chunks: Iterator[pl.DataFrame], start: datetime) -> Iterator[pl.DataFrame]:
    """Ascending chunks re-cut so that the first frame holds exactly the rows at or before `start`."""
    head: list[pl.DataFrame] = []
    for chunk in chunks:
        before = int(chunk["bar_time"].search_sorted(start, side="right"))
        head.append(chunk.slice(0, before))
        if before < chunk.height:
            yield pl.concat(head)
            yield chunk.slice(before)
            break
    else:
        yield pl.concat(head) if head else pl.DataFrame(schema=BAR_SCHEMA)
    yield from chunks



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
