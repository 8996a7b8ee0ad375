"""Bar sources by name: the mode decides which one a run reads."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import polars as pl

from signalgen.config.models import RunConfig
from signalgen.errors import ConfigError


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
