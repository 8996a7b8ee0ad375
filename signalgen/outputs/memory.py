"""An in-memory output: the test double for routing logic (like quix-streams' ListSink)."""

from __future__ import annotations

import polars as pl

from signalgen.errors import TransientError
from signalgen.outputs import client_batch
from signalgen.signals.types import SIGNAL_SCHEMA


class ListOutput:
    """Keeps each flushed batch in memory; `fail_next_flush` makes the next N flushes fail.

    A failing flush raises TransientError and drops what was pending, as a sink that lost the
    messages would: nothing of it counts as delivered, and the caller must replay.
    """

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.batches: list[pl.DataFrame] = []  # one frame per successful flush
        self.fail_next_flush = 0
        self.opened = self.closed = False
        self._pending: list[pl.DataFrame] = []

    def open(self) -> None:
        self.opened = True

    def write(self, batch: pl.DataFrame) -> None:
        """Buffer signals of this client (ValueError for any other client's row)."""
        self._pending.append(client_batch(batch, self.client_id))

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
