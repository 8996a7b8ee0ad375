"""The output protocol every signal destination implements."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Protocol, Self, runtime_checkable

import polars as pl

if TYPE_CHECKING:
    from signalgen.config.models import RunConfig


@runtime_checkable
class Output(Protocol):
    """A destination for one client's signals of one mode.

    Guarantee: when `flush()` returns, every batch passed to `write()` before it is durable at the
    destination; if `flush()` raises, nothing written since the last successful flush may be
    assumed delivered and the caller must not advance its checkpoint. Writes are idempotent by
    `signal_id`: delivering the same signal twice leaves one signal in effect.

    Backends subclass this protocol to inherit the default `own()`.
    """

    @classmethod
    def from_config(cls, cfg: RunConfig, client_id: str) -> Self:
        """The output of `client_id` for the run's mode, built from config only (not yet opened)."""

    def open(self) -> None: ...

    def write(self, batch: pl.DataFrame) -> None:
        """Accept signals (rows of `signalgen.signals.types.SIGNAL_SCHEMA`) of one client."""

    def own(self, strategy_id: str, start: datetime, end: datetime) -> None:
        """A batch run finished `strategy_id` over bar times (start, end]: what it wrote is all of
        that strategy's signals there, so a destination that holds a range (a file per day) may drop
        what the run no longer produces at the next flush. Default: nothing — a stream delivers
        messages and cannot take one back."""
        return None

    def flush(self) -> None: ...

    @classmethod
    def flush_all(cls, outputs: list[Self]) -> list[Exception]:
        """Flush several outputs of this backend (a writer's group commit flushes every client's at
        once): the exception of each output whose flush failed; the others are flushed all the same.
        Default: one by one. A backend whose flush has a per-call cost that several outputs can share
        overrides it (the local stream serialises all its clients' signals in one pass)."""
        errors: list[Exception] = []
        for out in outputs:
            try:
                out.flush()
            except Exception as exc:  # noqa: BLE001 - one failing output must not block the others
                errors.append(exc)
        return errors

    def close(self) -> None: ...
