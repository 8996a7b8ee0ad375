"""Read queries on the signal store: what `signals` and `runs` show.

A query is a small spec (`ReadQuery`), never SQL: each store backend turns it into its own query
(`SignalStore.read`), and the DuckDB backend can send it to the process that holds its file
(`signalgen.storage.readserver`).
"""

from __future__ import annotations

from collections.abc import Callable
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


def select_sql(query: ReadQuery, select: str, source: str, conds: list[str], time_col: str,
               quote: Callable[[str], str]) -> str:
    """The SELECT of `query` over `source` with its conditions `conds` (a backend's SQL, names quoted
    by `quote`): counts grouped and ordered by `count_by`, else rows by `time_col` (newest first when
    asked), then by worker and mode — the same bar in two modes would otherwise tie — and `limit`."""
    sql = f"SELECT {select} FROM {source}"
    if conds:
        sql += " WHERE " + " AND ".join(conds)
    if query.count_by is not None:
        groups = ", ".join(map(quote, query.count_by))
        return sql + f" GROUP BY {groups} ORDER BY {groups}" if groups else sql
    order = "DESC" if query.newest else "ASC"
    sql += f" ORDER BY {time_col} {order}"
    if query.kind != "runs":
        sql += f", client_id, strategy_id, symbol, timeframe, mode {order}"
    if query.limit is not None:
        sql += f" LIMIT {int(query.limit)}"
    return sql
