"""The output protocol every signal destination implements."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import polars as pl


@runtime_checkable
class Output(Protocol):
    """A destination for one client's signals.

    Guarantee: when `flush()` returns, every batch passed to `write()` before it is durable at the
    destination; if `flush()` raises, nothing written since the last successful flush may be
    assumed delivered and the caller must not advance its checkpoint. Writes are idempotent by
    `signal_id`: delivering the same signal twice leaves one signal in effect.
    """

    def open(self) -> None: ...

    def write(self, batch: pl.DataFrame) -> None:
        """Accept signals (rows of `signalgen.signals.types.SIGNAL_SCHEMA`) of one client."""

    def flush(self) -> None: ...

    def close(self) -> None: ...
