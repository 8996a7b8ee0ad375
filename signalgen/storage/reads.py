"""Read queries on the signal store: what `signals` and `runs` show.

A query is a small spec (`ReadQuery`), never SQL: the same spec runs in this process on a read-only
connection or, while a run holds the file, in the writer through its read socket
(`signalgen.storage.readserver`). `read()` picks the path.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import duckdb
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from signalgen.signals.types import REJECTION_SCHEMA, SIGNAL_SCHEMA

Name = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Names = Annotated[tuple[Name, ...], Field(max_length=100)]

# Columns a query returns, in order; ids as canonical UUID text.
COLUMNS: dict[str, tuple[str, ...]] = {
    "signals": tuple(SIGNAL_SCHEMA.names()),
    "rejections": tuple(REJECTION_SCHEMA.names()),
}
ID_COLUMN = {"signals": "signal_id", "rejections": "rejection_id"}


class ReadQuery(BaseModel):
    """What to read. Every filter is optional; lists match any of their values.

    `start`/`end` select bar times in (start, end], the range a run over the same dates covers.
    `since` selects rows generated at or after it (for `signals tail --follow`). `newest` orders
    newest first (by bar time, or start time for runs) before `limit` applies.
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


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def build_sql(query: ReadQuery) -> tuple[str, list[Any]]:
    """The SQL and parameters of `query`; every value is a parameter, every name a known column."""
    conds: list[str] = []
    params: list[Any] = []

    def any_of(column: str, values: tuple[str, ...]) -> None:
        if values:
            conds.append(f"{_q(column)} IN ({', '.join('?' for _ in values)})")
            params.extend(values)

    if query.kind == "runs":
        select, time_col = "*", "started_at"
        if query.clients:
            conds.append("list_has_any(clients, ?::VARCHAR[])")
            params.append(list(query.clients))
    else:
        time_col = "bar_time"
        select = ", ".join(f"CAST({_q(c)} AS VARCHAR) AS {_q(c)}" if c == ID_COLUMN[query.kind] else _q(c)
                           for c in COLUMNS[query.kind])
        any_of("client_id", query.clients)
        any_of("strategy_id", query.strategies)
        any_of("symbol", query.symbols)
        if query.start is not None:
            conds.append("bar_time > ?")
            params.append(query.start)
        if query.end is not None:
            conds.append("bar_time <= ?")
            params.append(query.end)
        if query.since is not None:
            conds.append("generated_at >= ?")
            params.append(query.since)
    any_of("mode", query.modes)
    if query.run_id is not None:
        conds.append("run_id = ?")
        params.append(query.run_id)
    sql = f"SELECT {select} FROM {query.kind}"
    if conds:
        sql += " WHERE " + " AND ".join(conds)
    order = "DESC" if query.newest else "ASC"
    sql += f" ORDER BY {time_col} {order}"
    if query.kind != "runs":
        sql += f", client_id, strategy_id, symbol, timeframe {order}"
    if query.limit is not None:
        sql += f" LIMIT {int(query.limit)}"
    return sql, params


def run_query(con: duckdb.DuckDBPyConnection, query: ReadQuery) -> pa.Table:
    """Run `query` on an open connection (the writer's cursor or a read-only connection)."""
    sql, params = build_sql(query)
    return con.sql(sql, params=params).to_arrow_table()
