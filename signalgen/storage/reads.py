"""Read queries on the signal store: what `signals` and `runs` show.

A query is a small spec (`ReadQuery`), never SQL: each store backend turns it into its own query
(`SignalStore.read`), and the DuckDB backend can send it to the process that holds its file
(`signalgen.storage.readserver`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from signalgen.signals.types import REJECTION_SCHEMA, SIGNAL_SCHEMA

Name = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Names = Annotated[tuple[Name, ...], Field(max_length=100)]

# Columns a query returns, in order; ids as canonical UUID text.
COLUMNS: dict[str, tuple[str, ...]] = {
    "signals": tuple(SIGNAL_SCHEMA.names()),
    "rejections": tuple(REJECTION_SCHEMA.names()),
}
ID_COLUMN = {"signals": "signal_id", "rejections": "rejection_id"}
# what a decision count can be grouped by (`ReadQuery.count_by`)
GroupColumn = Literal["client_id", "strategy_id", "symbol", "timeframe", "mode"]


class ReadQuery(BaseModel):
    """What to read. Every filter is optional; lists match any of their values.

    `start`/`end` select bar times in (start, end], the range a run over the same dates covers.
    `since` selects rows generated at or after it (for `signals tail --follow`). `newest` orders
    newest first (by bar time, or start time for runs) before `limit` applies.
    `count_by` (signals and rejections) returns counts instead of rows: the `count_by` columns and
    `count`, one row per group that has rows, ordered by the groups; `()` counts every matching row.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["signals", "rejections", "runs"]
    clients: Names = ()
    strategies: Names = ()
    symbols: Names = ()
    modes: Names = ()
    run_id: Name | None = None
    start: datetime | None = None
    end: datetime | None = None
    since: datetime | None = None
    limit: Annotated[int, Field(ge=1, le=10_000_000)] | None = None
    newest: bool = False
    count_by: tuple[GroupColumn, ...] | None = None

    @model_validator(mode="after")
    def _counts_decisions(self) -> ReadQuery:
        if self.count_by is not None and self.kind == "runs":
            raise ValueError("count_by counts signals or rejections, not runs")
        return self
