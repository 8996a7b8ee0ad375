"""An in-memory output: the test double for routing logic (like quix-streams' ListSink)."""

from __future__ import annotations

from datetime import datetime
from typing import Self

import polars as pl

from signalgen.config.models import RunConfig
from signalgen.errors import TransientError
from signalgen.outputs import client_batch
from signalgen.outputs.base import Output
from signalgen.signals.types import SIGNAL_SCHEMA


class ListOutput(Output):
    """Keeps each flushed batch in memory; `fail_next_flush` makes the next N flushes fail.

    A failing flush raises TransientError and drops what was pending, as a sink that lost the
    messages would: nothing of it counts as delivered, and the caller must replay.
    """

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.batches: list[pl.DataFrame] = []  # one frame per successful flush
        self.fail_next_flush = 0
        self.opened = self.closed = False
        self.owned: list[tuple[str, datetime, datetime]] = []  # every own() call, to test routing
        self._pending: list[pl.DataFrame] = []

    @classmethod
    def from_config(cls, cfg: RunConfig, client_id: str) -> Self:
        return cls(client_id)

    def open(self) -> None:
        self.opened = True

    def write(self, batch: pl.DataFrame) -> None:
        """Buffer signals of this client (ValueError for any other client's row)."""
        self._pending.append(client_batch(batch, self.client_id))

    def own(self, strategy_id: str, start: datetime, end: datetime) -> None:
        self.owned.append((strategy_id, start, end))

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        if self.fail_next_flush > 0:
            self.fail_next_flush -= 1
            raise TransientError(f"memory output of {self.client_id}: simulated sink failure")
        if pending:
            self.batches.append(pl.concat(pending))

    def close(self) -> None:
        """Flush what is still buffered."""
        self.flush()
        self.closed = True

    @property
    def signals(self) -> pl.DataFrame:
        """Every delivered signal, in delivery order (a replay may deliver one twice)."""
        return pl.concat(self.batches) if self.batches else SIGNAL_SCHEMA.to_frame()
