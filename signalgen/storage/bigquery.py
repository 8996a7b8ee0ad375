"""The cloud signal store: BigQuery, one dataset per client, any number of readers and hosts.

Datasets: `<prefix>_<client>` holds a client's decisions (`signals`, `rejections`, their
`superseded_*` audit tables, `signal_revisions`); `<prefix>_system` holds `runs`,
`worker_checkpoints`, `bar_rejections` and the short-lived staging tables (`_stage_*`, expiring after
an hour when a writer dies before dropping one). Decision tables and bar rejections are partitioned
by day of `bar_time` and clustered by strategy and symbol; every read and write that knows its bar
times filters on them, so it touches only the partitions of its range.

The semantics are DuckDB's (`storage/duckdb.py`), row for row: one current decision per
DECISION_KEY, a decision replaced by another id moved to `superseded_<table>`, revisions and
retractions in `Written.stream` (docs/streams.md), upserts everywhere. A batch is written as:
  1. one load job (Parquet from memory, a resumable upload: no `size`) into a fresh staging table,
  2. three reads of what the batch's bars hold (stored signals with their revisions, stored
     rejection ids, recorded revisions of the batch's signals), from which the stream is computed
     here exactly as DuckDB computes it,
  3. one script in one transaction: the audit INSERTs (only when a bar changes id), the revisions
     MERGE (only when one changes), then one MERGE per decision table per client.
Never legacy streaming inserts (insertAll): rows streamed that way cannot be changed by DML for 30
minutes, and every write here is a MERGE.

Quotas (docs/cloud.md, "BigQuery store", has the arithmetic): load jobs count 1,500 per table per
day and 100,000 per project per day; each flush loads one staging table of its own once, so the
per-table limit never binds and a flush costs one of the project's loads. MERGE/UPDATE/DELETE
statements have no daily quota; per table 2 run at once and 20 more queue. The writer's group
commit (`process/writer_server.py`) gathers for 8x its last commit's duration, so a store whose
commit takes seconds flushes at most every tens of seconds.

google.cloud.bigquery (~1.3 s, ~130 MB to import) is imported when a store connects, never when
this module is.
"""

from __future__ import annotations

import io
import json
import os
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import polars as pl

from signalgen.config.models import EnvironmentConfig
from signalgen.errors import SignalgenError, StorageError, TransientError
from signalgen.signals.types import REJECTION_SCHEMA, SIGNAL_SCHEMA, STREAM_SCHEMA, VOLATILE, stream_rows
from signalgen.errors import storage_error
from signalgen.storage.base import (DECISION_ID, DECISION_KEY, FINISH_FIELDS, RUN_SCHEMA, TABLES,
                                    RunRecord, Written, fill_run, owner_gone, prepare, run_owner)
from signalgen.storage.reads import COLUMNS, ReadQuery, select_sql

_UTC = pl.Datetime("us", "UTC")
AUDIT = {"superseded_by": pl.String, "superseded_by_run": pl.String}
CHECKPOINT_SCHEMA = pl.Schema({"worker_id": pl.String, "mode": pl.String, "checkpoint": _UTC, "updated_at": _UTC})
REVISION_SCHEMA = pl.Schema({"signal_id": pl.String, "mode": pl.String, "revision": pl.Int32})
# tables of a client's dataset and of the system dataset: name -> schema
CLIENT_TABLES: dict[str, pl.Schema] = {
    "signals": SIGNAL_SCHEMA, "rejections": REJECTION_SCHEMA,
    "superseded_signals": pl.Schema({**SIGNAL_SCHEMA, **AUDIT}),
    "superseded_rejections": pl.Schema({**REJECTION_SCHEMA, **AUDIT}),
    "signal_revisions": REVISION_SCHEMA,
}
SYSTEM_TABLES: dict[str, pl.Schema] = {
    "runs": RUN_SCHEMA, "worker_checkpoints": CHECKPOINT_SCHEMA, "bar_rejections": TABLES["bar_rejections"][0],
}
PARTITIONED = {"signals", "rejections", "superseded_signals", "superseded_rejections", "bar_rejections"}
CLUSTERING = {"bar_rejections": ["symbol", "timeframe"]}  # decision tables: strategy_id, symbol

WORKER_KEY = tuple(k for k in DECISION_KEY if k != "bar_time")
_CONTENT = tuple(c for c in SIGNAL_SCHEMA if c not in (*DECISION_KEY, *VOLATILE, "signal_id"))
_STAGE_TTL = timedelta(hours=1)
_KINDS = {pl.String: "STRING", pl.Int64: "INT64", pl.Float64: "FLOAT64", _UTC: "TIMESTAMP", pl.List(pl.String): "STRING"}
_TRANSIENT_STATUS = {429, 500, 502, 503, 504}


def endpoint(configured: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The API endpoint: `storage.api_endpoint`, else `BIGQUERY_EMULATOR_HOST` (host:port) as
    http://host:port, else None (BigQuery itself, with Application Default Credentials)."""
    if configured:
        return configured
    host = environ.get("BIGQUERY_EMULATOR_HOST", "").strip()
    if not host:
        return None
    return host if "://" in host else f"http://{host}"


def is_transient(exc: BaseException) -> bool:
    """A failure that resolves itself: the service unreachable, overloaded or slow (connection
    refused, timeouts, 429/5xx, retries given up), or a transaction that met a concurrent one."""
    import requests
    from google.api_core import exceptions as gexc

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (gexc.RetryError, gexc.DeadlineExceeded, requests.ConnectionError, requests.Timeout,
                            ConnectionError, TimeoutError)):
            return True
        if isinstance(exc, gexc.GoogleAPICallError) and (exc.code in _TRANSIENT_STATUS
                                                          or "concurrent update" in str(exc).lower()):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _q(name: str) -> str:
    return "`" + name.replace("`", "") + "`"


def _field(name: str, dtype: pl.DataType, mode: str = "NULLABLE") -> Any:
    """The BigQuery column for a polars dtype of the record schemas."""
    from google.cloud.bigquery import SchemaField

    if isinstance(dtype, pl.List):
        return _field(name, dtype.inner, "REPEATED")
    if isinstance(dtype, pl.Struct):
        return SchemaField(name, "RECORD", mode=mode, fields=[_field(f.name, f.dtype) for f in dtype.fields])
    if isinstance(dtype, pl.Datetime):
        kind = "TIMESTAMP"
    elif dtype.is_integer():
        kind = "INT64"
    else:
        kind = {pl.String: "STRING", pl.Float64: "FLOAT64", pl.Boolean: "BOOL"}[dtype.base_type()]
    return SchemaField(name, kind, mode=mode)


def _bq_schema(schema: Mapping[str, pl.DataType]) -> list[Any]:
    return [_field(c, t) for c, t in schema.items()]


def _param(name: str, value: Any, kind: str | None = None) -> Any:
    from google.cloud.bigquery import ArrayQueryParameter, ScalarQueryParameter

    if isinstance(value, (list, tuple)):
        return ArrayQueryParameter(name, kind or "STRING", list(value))
    if kind is None:
        kind = ("BOOL" if isinstance(value, bool) else "INT64" if isinstance(value, int)
                else "FLOAT64" if isinstance(value, float) else "TIMESTAMP" if isinstance(value, datetime)
                else "STRING")
    return ScalarQueryParameter(name, kind, value)


_LITERAL = re.compile(r"^[A-Za-z0-9_.:+ -]{0,200}$")


def _literal(value: Any) -> str:
    """A value written into a script's text. The emulator passes no query parameters to the statements
    of a script (bqemulator 1.4.0: "Values were not provided ..."), so the one script of a write holds
    its few values inline: timestamps, counts, and text of ids and modes, refused unless it is made of
    characters that cannot end a literal (ids are UUID text, client ids and modes safe names)."""
    if isinstance(value, datetime):
        return f"TIMESTAMP '{value.astimezone(timezone.utc).isoformat(sep=' ')}'"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and _LITERAL.match(value):
        return f"'{value}'"
    raise ValueError(f"{value!r} cannot be written into a BigQuery script")


def _cast(df: pl.DataFrame, schema: Mapping[str, pl.DataType]) -> pl.DataFrame:
    """A query result in the record schema (BigQuery has only INT64: Int8/Int32 come back wider)."""
    if df.width == 0:
        return pl.DataFrame(schema=schema)
    return df.select(schema.keys()).cast(dict(schema))


class BigQueryStore:
    """Signals, rejections, bar rejections, runs and checkpoints in BigQuery (see the module doc).

    Any number of processes may read and write it; each writes its own staging tables.
    """

    def __init__(self, project: str, dataset_prefix: str = "signalgen", location: str = "US",
                 api_endpoint: str | None = None, timeout_s: float = 120.0, retry_s: float = 30.0) -> None:
        self.project, self.prefix, self.location = project, dataset_prefix, location
        self.api_endpoint = api_endpoint
        self.timeout_s, self.retry_s = timeout_s, retry_s
        self._client: Any = None
        self._opened = False
        self._ready: set[str] = set()  # datasets whose tables exist

    def __str__(self) -> str:
        return f"bigquery:{self.project}.{self.prefix}_*"

    @classmethod
    def from_config(cls, environment: EnvironmentConfig, root: Path) -> Self:
        s = environment.storage
        return cls(s.project, s.dataset_prefix, s.location, s.api_endpoint)

    # ------------------------------------------------------------ lifecycle

    @property
    def system(self) -> str:
        return f"{self.prefix}_system"

    def dataset(self, client_id: str) -> str:
        """The dataset of a client's decisions (a dataset name has no '-': it becomes '_')."""
        return f"{self.prefix}_{client_id.replace('-', '_')}"

    def _table(self, dataset: str, table: str) -> str:
        return f"{self.project}.{dataset}.{table}"

    @property
    def client(self) -> Any:
        """The API client, made on first use (an unopened store reads through it too)."""
        if self._client is None:
            try:
                from google.api_core.client_options import ClientOptions
                from google.api_core.retry import Retry
                from google.auth.credentials import AnonymousCredentials
                from google.cloud import bigquery
            except ImportError as exc:  # pragma: no cover - the gcp extra is missing
                raise ImportError("the BigQuery store needs: pip install 'signalgen[gcp]'") from exc
            url = endpoint(self.api_endpoint)
            with self._errors(f"{self.project} (connect)", "reach"):
                if url:
                    self._client = bigquery.Client(project=self.project, location=self.location,
                                                   credentials=AnonymousCredentials(),
                                                   client_options=ClientOptions(api_endpoint=url))
                else:
                    self._client = bigquery.Client(project=self.project, location=self.location)
            self._retry = bigquery.DEFAULT_RETRY.with_deadline(self.retry_s)
            self._job_retry = Retry(predicate=lambda exc: False)  # a failed job is this store's to judge
        return self._client

    def open(self) -> None:
        """Connect and create the system dataset and its tables if needed."""
        if not self._opened:
            self._ensure(self.system, SYSTEM_TABLES)
            self._opened = True

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client, self._opened = None, False
        self._ready.clear()

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def serve_reads(self) -> AbstractContextManager[None]:
        """Nothing to do: any process reads BigQuery itself."""
        return nullcontext()

    def _need_open(self) -> None:
        if not self._opened:
            raise RuntimeError(f"{self}: call open() first")

    @contextmanager
    def _errors(self, where: str, doing: str = "write") -> Iterator[None]:
        """API failures as TransientError (the service unreachable or overloaded: wait and retry) or
        StorageError, one line naming the dataset or table."""
        try:
            yield
        except (SignalgenError, ValueError, KeyError, RuntimeError, ImportError):
            raise
        except Exception as exc:
            if is_transient(exc):
                reason = (getattr(exc, "message", None) or str(exc) or type(exc).__name__).strip().splitlines()[0]
                raise TransientError(f"BigQuery cannot {doing} {where} now: {reason[:200]}") from exc
            if doing == "write":
                raise storage_error(where, exc) from exc
            text = (getattr(exc, "message", None) or str(exc) or type(exc).__name__).strip().splitlines()[0]
            raise StorageError(f"cannot {doing} {where}: {text[:200]}") from exc

    def _ensure(self, dataset: str, tables: Mapping[str, pl.Schema]) -> None:
        """Create `dataset` and its tables if needed (once per store); append columns a table made by
        an older version lacks (as DuckDB's runs gain theirs)."""
        if dataset in self._ready:
            return
        from google.cloud import bigquery

        with self._errors(f"{self.project}.{dataset}"):
            ds = bigquery.Dataset(f"{self.project}.{dataset}")
            ds.location = self.location
            self.client.create_dataset(ds, exists_ok=True, retry=self._retry, timeout=self.timeout_s)
            for name, schema in tables.items():
                table = bigquery.Table(self._table(dataset, name), schema=_bq_schema(schema))
                if name in PARTITIONED:
                    table.time_partitioning = bigquery.TimePartitioning(
                        type_=bigquery.TimePartitioningType.DAY, field="bar_time")
                    table.clustering_fields = CLUSTERING.get(name, ["strategy_id", "symbol"])
                made = self.client.create_table(table, exists_ok=True, retry=self._retry, timeout=self.timeout_s)
                have = {f.name for f in made.schema}
                if missing := [f for f in _bq_schema(schema) if f.name not in have]:
                    made.schema = [*made.schema, *missing]
                    self.client.update_table(made, ["schema"], retry=self._retry, timeout=self.timeout_s)
        self._ready.add(dataset)

    # ------------------------------------------------------------ jobs

    def _run(self, sql: str, params: Sequence[Any] = (), *, where: str, doing: str = "write") -> Any:
        """Run one query or script; the finished job."""
        from google.cloud import bigquery

        with self._errors(where, doing):
            job = self.client.query(sql, job_config=bigquery.QueryJobConfig(query_parameters=list(params)),
                                    retry=self._retry, job_retry=self._job_retry, timeout=self.timeout_s)
            job.result(retry=self._retry, timeout=self.timeout_s)
        return job

    def _frame(self, sql: str, params: Sequence[Any] = (), *, where: str,
               schema: Mapping[str, pl.DataType] | None = None) -> pl.DataFrame:
        job = self._run(sql, params, where=where, doing="read")
        with self._errors(where, "read"):
            table = job.to_arrow(create_bqstorage_client=False)
        df = pl.from_arrow(table) if table.num_columns else pl.DataFrame()
        return _cast(df, schema) if schema is not None else df

    @contextmanager
    def _staged(self, df: pl.DataFrame) -> Iterator[str]:
        """`df` loaded into a fresh staging table of the system dataset (one load job: Parquet from
        memory, without `size`, a resumable upload); its name, dropped on the way out."""
        from google.cloud import bigquery

        name = self._table(self.system, f"_stage_{uuid.uuid4().hex}")
        df = df.with_columns(pl.col(c).cast(pl.Int64) for c, t in df.schema.items()
                             if t.is_integer() and t != pl.Int64)
        schema = _bq_schema(df.schema)
        buf = io.BytesIO()
        df.write_parquet(buf)
        buf.seek(0)
        try:
            with self._errors(name):
                table = bigquery.Table(name, schema=schema)
                table.expires = datetime.now(timezone.utc) + _STAGE_TTL
                self.client.create_table(table, retry=self._retry, timeout=self.timeout_s)
                config = bigquery.LoadJobConfig(source_format=bigquery.SourceFormat.PARQUET, schema=schema,
                                                write_disposition=bigquery.WriteDisposition.WRITE_APPEND)
                config.parquet_options = bigquery.ParquetOptions()
                config.parquet_options.enable_list_inference = True
                self.client.load_table_from_file(buf, name, job_config=config, timeout=self.timeout_s).result(
                    retry=self._retry, timeout=self.timeout_s)
            yield f"`{name}`"
        finally:
            if self._client is not None:
                try:
                    self.client.delete_table(name, not_found_ok=True, retry=self._retry, timeout=self.timeout_s)
                except Exception:  # noqa: BLE001 - it expires on its own
                    pass

    # ------------------------------------------------------------ records

    def write_signals(self, df: pl.DataFrame) -> int:
        return self.write_decisions(df, REJECTION_SCHEMA.to_frame()).rows

    def write_rejections(self, df: pl.DataFrame) -> int:
        return self.write_decisions(SIGNAL_SCHEMA.to_frame(), df).rows

    def write_decisions(self, signals: pl.DataFrame, rejections: pl.DataFrame) -> Written:
        """Make one batch the current decisions of their bars, as DuckDBStore.write_decisions does:
        one load, three reads, one transaction (see the module doc)."""
        self._need_open()
        sig, rej = prepare("signals", signals), prepare("rejections", rejections)
        keys = pl.concat([df.select(*DECISION_KEY, pl.col(DECISION_ID[t]).alias("id"), "run_id",
                                    pl.lit(t == "signals").alias("is_signal")) for t, df in (("signals", sig),
                                                                                          ("rejections", rej))])
        if keys.is_empty():
            return Written(0, stream_rows(sig))
        clients = sorted(set(keys["client_id"]))
        for c in clients:
            self._ensure(self.dataset(c), CLIENT_TABLES)
        staged = pl.concat([sig.with_columns(is_signal=pl.lit(True)), rej.with_columns(is_signal=pl.lit(False))],
                           how="diagonal").with_columns(id=pl.coalesce("signal_id", "rejection_id"))
        span = [_param("lo", keys["bar_time"].min()), _param("hi", keys["bar_time"].max())]
        on = " AND ".join(f"t.{_q(k)} = s.{_q(k)}" for k in DECISION_KEY) + " AND t.bar_time BETWEEN @lo AND @hi"
        where = f"{self.project}.{self.prefix}_{{{','.join(clients)}}}"
        with self._staged(staged) as stage:
            def union(select: str) -> str:
                return " UNION ALL ".join(select.format(ds=f"`{self.project}.{self.dataset(c)}`") for c in clients)

            held = self._frame(union(
                f"SELECT t.*, v.revision AS _revision FROM {{ds}}.signals t JOIN {stage} s ON {on} "
                "LEFT JOIN {ds}.signal_revisions v ON v.signal_id = t.signal_id AND v.mode = t.mode"),
                span, where=where, schema={**SIGNAL_SCHEMA, "_revision": pl.Int32})
            held_rej = self._frame(union(f"SELECT t.rejection_id AS id, {', '.join(f't.{_q(k)}' for k in DECISION_KEY)} "
                                         f"FROM {{ds}}.rejections t JOIN {stage} s ON {on}"),
                                   span, where=where, schema={"id": pl.String, **{k: keys.schema[k] for k in DECISION_KEY}})
            recorded = self._frame(union(f"SELECT v.signal_id, v.mode, v.revision FROM {{ds}}.signal_revisions v "
                                         f"JOIN {stage} s ON v.signal_id = s.signal_id AND v.mode = s.mode"),
                                   where=where, schema=REVISION_SCHEMA)
            stream, revised = _revise(sig, keys, held, recorded)
            lo, hi = _literal(keys["bar_time"].min()), _literal(keys["bar_time"].max())
            script = self._script(stage, on.replace("@lo", lo).replace("@hi", hi), clients, keys, held, held_rej,
                                  revised)
            self._run(script, where=where)
        return Written(keys.height, stream)

    def _script(self, stage: str, on: str, clients: list[str], keys: pl.DataFrame, held: pl.DataFrame,
                held_rej: pl.DataFrame, revised: pl.DataFrame) -> str:
        """The transaction that writes a staged batch: audit rows, revisions, then one MERGE per
        decision table and client."""
        statements = ["BEGIN TRANSACTION"]
        by_key = keys.select(*DECISION_KEY, "id")
        for c in clients:
            ds = f"`{self.project}.{self.dataset(c)}`"
            for table, stored in (("signals", held.rename({"signal_id": "stored"})),
                                  ("rejections", held_rej.rename({"id": "stored"}))):
                id_col = DECISION_ID[table]
                moved = stored.filter(pl.col("client_id") == c).join(by_key, on=list(DECISION_KEY))
                if moved.filter(pl.col("stored") != pl.col("id")).height:  # a bar decided with another id
                    cols = ", ".join(_q(col) for col in TABLES[table][0])
                    tcols = ", ".join(f"t.{_q(col)}" for col in TABLES[table][0])
                    statements.append(
                        f"INSERT INTO {ds}.superseded_{table} ({cols}, superseded_by, superseded_by_run) "
                        f"SELECT {tcols}, s.id, s.run_id FROM {ds}.{table} t JOIN {stage} s ON {on} "
                        f"AND t.{id_col} <> s.id WHERE NOT EXISTS (SELECT 1 FROM {ds}.superseded_{table} x "
                        f"WHERE x.{id_col} = t.{id_col} AND x.mode = t.mode)")
            mine = revised.filter(pl.col("client_id") == c)
            if mine.height:
                rows = [f"SELECT {_literal(sid)} AS signal_id, {_literal(mode)} AS mode, {int(rev)} AS revision"
                        for sid, mode, rev in mine.select("signal_id", "mode", "revision").rows()]
                statements.append(
                    f"MERGE {ds}.signal_revisions t USING ({' UNION ALL '.join(rows)}) s "
                    "ON t.signal_id = s.signal_id AND t.mode = s.mode WHEN MATCHED THEN UPDATE SET revision = s.revision "
                    "WHEN NOT MATCHED THEN INSERT (signal_id, mode, revision) VALUES (s.signal_id, s.mode, s.revision)")
            for table, mine_only in (("signals", "s.is_signal"), ("rejections", "NOT s.is_signal")):
                cols = TABLES[table][0].names()
                statements.append(
                    f"MERGE {ds}.{table} t USING (SELECT * FROM {stage} WHERE client_id = {_literal(c)}) s ON {on} "
                    f"WHEN MATCHED AND {mine_only} THEN UPDATE SET "
                    + ", ".join(f"{_q(col)} = s.{_q(col)}" for col in cols)
                    + " WHEN MATCHED THEN DELETE "
                    f"WHEN NOT MATCHED AND {mine_only} THEN INSERT ({', '.join(map(_q, cols))}) "
                    f"VALUES ({', '.join(f's.{_q(col)}' for col in cols)})")
        statements.append("COMMIT TRANSACTION")
        return ";\n".join(statements)

    def write_bar_rejections(self, df: pl.DataFrame, run_id: str | None = None, mode: str | None = None) -> int:
        """Upsert rejected bars by (symbol, timeframe, bar_time, reason, mode, detail), as DuckDB does."""
        self._need_open()
        df = prepare("bar_rejections", fill_run(df, run_id, mode))
        if df.is_empty():
            return 0
        schema, key = TABLES["bar_rejections"]
        on = " AND ".join(f"t.{_q(k)} IS NOT DISTINCT FROM s.{_q(k)}" for k in key)
        on += " AND (t.bar_time BETWEEN @lo AND @hi OR t.bar_time IS NULL)"
        cols = schema.names()
        table = self._table(self.system, "bar_rejections")
        with self._staged(df) as stage:
            self._run(f"MERGE `{table}` t USING {stage} s ON {on} "
                      "WHEN MATCHED THEN UPDATE SET " + ", ".join(f"{_q(c)} = s.{_q(c)}" for c in cols if c not in key)
                      + f" WHEN NOT MATCHED THEN INSERT ({', '.join(map(_q, cols))}) "
                      f"VALUES ({', '.join(f's.{_q(c)}' for c in cols)})",
                      [_param("lo", df["bar_time"].min(), "TIMESTAMP"), _param("hi", df["bar_time"].max(), "TIMESTAMP")],
                      where=table)
        return df.height

    # ------------------------------------------------------------ checkpoints

    def write_checkpoints(self, mode: str, checkpoints: Mapping[str, datetime]) -> None:
        """Record each worker's checkpoint in `mode`, replacing the one it had: one MERGE."""
        self._need_open()
        if not checkpoints:
            return
        rows, params = [], [_param("mode", mode)]
        for i, (worker, at) in enumerate(checkpoints.items()):
            rows.append(f"SELECT @w{i} AS worker_id, @t{i} AS checkpoint")
            params += [_param(f"w{i}", worker), _param(f"t{i}", at, "TIMESTAMP")]
        table = self._table(self.system, "worker_checkpoints")
        self._run(f"MERGE `{table}` t USING ({' UNION ALL '.join(rows)}) s "
                  "ON t.worker_id = s.worker_id AND t.mode = @mode "
                  "WHEN MATCHED THEN UPDATE SET checkpoint = s.checkpoint, updated_at = CURRENT_TIMESTAMP() "
                  "WHEN NOT MATCHED THEN INSERT (worker_id, mode, checkpoint, updated_at) "
                  "VALUES (s.worker_id, @mode, s.checkpoint, CURRENT_TIMESTAMP())", params, where=table)

    def checkpoints(self, mode: str) -> dict[str, datetime]:
        """Worker id -> checkpoint of every worker that has one in `mode`."""
        table = self._table(self.system, "worker_checkpoints")
        df = self._frame(f"SELECT worker_id, checkpoint FROM `{table}` WHERE mode = @mode", [_param("mode", mode)],
                         where=table, schema={"worker_id": pl.String, "checkpoint": _UTC})
        return dict(df.iter_rows())

    # ------------------------------------------------------------ runs

    def start_run(self, run: RunRecord) -> None:
        """Record a run's start and its owner (replacing any earlier row with the same run_id, its
        outcome emptied): one MERGE."""
        self._need_open()
        record = {**{f.name: getattr(run, f.name) for f in fields(RunRecord)}, **run_owner()}
        record["clients"] = list(run.clients)
        params = [_param(f"v{i}", json.dumps(record[c], sort_keys=True) if isinstance(record.get(c), Mapping)
                         else record.get(c), _KINDS[RUN_SCHEMA[c]]) for i, c in enumerate(RUN_SCHEMA)]
        source = ", ".join(f"@v{i} AS {_q(c)}" for i, c in enumerate(RUN_SCHEMA))
        table = self._table(self.system, "runs")
        self._run(f"MERGE `{table}` t USING (SELECT {source}) s ON t.run_id = s.run_id "
                  "WHEN MATCHED THEN UPDATE SET " + ", ".join(f"{_q(c)} = s.{_q(c)}" for c in RUN_SCHEMA if c != "run_id")
                  + f" WHEN NOT MATCHED THEN INSERT ({', '.join(map(_q, RUN_SCHEMA))}) "
                  f"VALUES ({', '.join(f's.{_q(c)}' for c in RUN_SCHEMA)})", params, where=table)

    def finish_run(self, run_id: str, **values: Any) -> None:
        """Record a run's outcome: any of FINISH_FIELDS (rejections_by_reason as JSON or a dict)."""
        unknown = sorted(set(values) - set(FINISH_FIELDS))
        if unknown:
            raise ValueError(f"unknown run fields {unknown}; allowed: {', '.join(FINISH_FIELDS)}")
        if not values:
            return
        self._need_open()
        if isinstance(values.get("rejections_by_reason"), Mapping):
            values["rejections_by_reason"] = json.dumps(values["rejections_by_reason"], sort_keys=True)
        params = [_param("run_id", run_id)] + [_param(k, v, _KINDS[RUN_SCHEMA[k]]) for k, v in values.items()]
        table = self._table(self.system, "runs")
        job = self._run(f"UPDATE `{table}` SET {', '.join(f'{_q(k)} = @{k}' for k in values)} WHERE run_id = @run_id",
                        params, where=table)
        if not job.num_dml_affected_rows:
            raise KeyError(f"run {run_id!r} was never started in {table}")

    def abandon_stale_runs(self, now: datetime) -> list[str]:
        """Mark the runs without a status whose owner is gone as 'abandoned' (finished_at = `now`);
        their ids. Many hosts share this store: only a run of this host whose process is dead is
        judged gone (`owner_gone`), never one of another host or without an owner."""
        self._need_open()
        table = self._table(self.system, "runs")
        open_runs = self._frame(f"SELECT run_id, host, pid, started_at FROM `{table}` WHERE status IS NULL",
                                where=table, schema={"run_id": pl.String, "host": pl.String, "pid": pl.Int64,
                                                     "started_at": _UTC})
        gone = sorted(r[0] for r in open_runs.iter_rows() if owner_gone(*r[1:], ownerless=False))
        if gone:
            self._run(f"UPDATE `{table}` SET status = 'abandoned', finished_at = @now "
                      "WHERE status IS NULL AND run_id IN UNNEST(@ids)",
                      [_param("now", now), _param("ids", gone)], where=table)
        return gone

    # ------------------------------------------------------------ reads

    def _datasets(self) -> set[str]:
        with self._errors(f"{self.project}.{self.prefix}_*", "read"):
            return {d.dataset_id for d in self.client.list_datasets(retry=self._retry, timeout=self.timeout_s)}

    def _client_datasets(self, clients: Sequence[str]) -> list[str]:
        """The client datasets a read covers: the named clients' that exist, else every one."""
        have = self._datasets()
        if clients:
            return sorted(have & {self.dataset(c) for c in clients})
        return sorted(d for d in have if d.startswith(f"{self.prefix}_") and d != self.system)

    def count(self, table: str, **where: Any) -> int:
        """Rows of `table` (of every client, for a client table) whose columns equal the given values
        (None matches NULL)."""
        schema = CLIENT_TABLES.get(table) or SYSTEM_TABLES.get(table)
        if schema is None:
            raise ValueError(f"unknown table {table!r}; tables: {', '.join([*CLIENT_TABLES, *SYSTEM_TABLES])}")
        bad = sorted(set(where) - set(schema))
        if bad:
            raise ValueError(f"table {table} has no columns {bad}")
        datasets = self._client_datasets(()) if table in CLIENT_TABLES else [self.system]
        if not datasets:
            return 0
        conds = [f"{_q(k)} IS NULL" if v is None else f"{_q(k)} = @p{i}" for i, (k, v) in enumerate(where.items())]
        params = [_param(f"p{i}", v) for i, (k, v) in enumerate(where.items()) if v is not None]
        source = " UNION ALL ".join(f"SELECT * FROM `{self._table(d, table)}`" for d in datasets)
        sql = f"SELECT count(*) AS n FROM ({source})" + (f" WHERE {' AND '.join(conds)}" if conds else "")
        return self._frame(sql, params, where=table)["n"].item()

    def rows(self, table: str) -> pl.DataFrame:
        """Every row of `table` (of every client, for a client table), in its schema."""
        schema = CLIENT_TABLES.get(table) or SYSTEM_TABLES[table]
        datasets = self._client_datasets(()) if table in CLIENT_TABLES else [self.system]
        if not datasets:
            return pl.DataFrame(schema=schema)
        cols = ", ".join(map(_q, schema))
        sql = " UNION ALL ".join(f"SELECT {cols} FROM `{self._table(d, table)}`" for d in datasets)
        return self._frame(sql, where=table, schema=schema)

    def read(self, query: ReadQuery) -> pl.DataFrame:
        """Rows matching `query` (reads.COLUMNS, RUN_SCHEMA for runs, or counts), as DuckDB returns
        them: same columns, types and order. Opened or not: any process reads BigQuery."""
        if query.kind == "runs":
            schema = RUN_SCHEMA
            if not self._opened and self.system not in self._datasets():  # a store nobody has written yet
                return pl.DataFrame(schema=schema)
            source = f"`{self._table(self.system, 'runs')}`"
        else:
            schema = pl.Schema({c: (SIGNAL_SCHEMA if query.kind == "signals" else REJECTION_SCHEMA)[c]
                                for c in COLUMNS[query.kind]})
            datasets = self._client_datasets(query.clients)
            if not datasets:
                return _cast(pl.DataFrame(), self._read_schema(query, schema))
            cols = ", ".join(map(_q, schema))
            source = "(" + " UNION ALL ".join(f"SELECT {cols} FROM `{self._table(d, query.kind)}`"
                                              for d in datasets) + ")"
        sql, params = build_sql(query, source)
        return self._frame(sql, params, where=f"{self.project}.{self.prefix}_* {query.kind}",
                           schema=self._read_schema(query, schema))

    @staticmethod
    def _read_schema(query: ReadQuery, schema: pl.Schema) -> pl.Schema:
        if query.count_by is None:
            return schema
        return pl.Schema({**{c: schema[c] for c in query.count_by}, "count": pl.Int64})


def _revise(signals: pl.DataFrame, keys: pl.DataFrame, held: pl.DataFrame,
            recorded: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(`Written.stream`, the revisions to record), from the batch and what its bars held: DuckDB's
    `_revise` rule for rule. `held`: the stored signals of the batch's bars with their recorded
    revision (`_revision`); `recorded`: the recorded revisions of the batch's signals."""
    stored = held.select(*DECISION_KEY, "signal_id", *(pl.col(c).alias(f"{c}_t") for c in _CONTENT),
                         pl.lit(True).alias("held"))
    mine = signals.join(stored, on=[*DECISION_KEY, "signal_id"], how="left", maintain_order="left").join(recorded, on=["signal_id", "mode"], how="left", maintain_order="left")
    same = pl.all_horizontal(pl.col(c).eq_missing(pl.col(f"{c}_t")) for c in _CONTENT)
    old, is_held = pl.col("revision").fill_null(0), pl.col("held").fill_null(False)
    mine = mine.with_columns(new=pl.when(is_held & same).then(old)
                             .when(is_held | pl.col("revision").is_not_null()).then(old + 1)
                             .otherwise(0).cast(pl.Int32))
    changed = mine.filter(pl.col("new") != old).select("client_id", "signal_id", "mode", revision="new")
    stream = mine.with_columns(revision="new", retracted=pl.lit(False)).select(STREAM_SCHEMA.names())
    retracted = held.join(keys.select(*DECISION_KEY, "id", "is_signal", pl.col("run_id").alias("by_run")),
                          on=list(DECISION_KEY)).filter(~pl.col("is_signal") | (pl.col("id") != pl.col("signal_id")))
    retracted = retracted.sort(*DECISION_KEY).with_columns(
        run_id="by_run", revision=(pl.col("_revision").fill_null(0) + 1).cast(pl.Int32), retracted=pl.lit(True))
    changed = pl.concat([changed, retracted.select("client_id", "signal_id", "mode", "revision")])
    return pl.concat([stream, retracted.select(STREAM_SCHEMA.names())]), changed


def build_sql(query: ReadQuery, source: str) -> tuple[str, list[Any]]:
    """The GoogleSQL of `query` over `source` (a table or a UNION ALL of the clients' tables) and its
    parameters: every value a parameter, every name a known column; DuckDB's `build_sql`, in
    GoogleSQL."""
    conds: list[str] = []
    params: list[Any] = []

    def add(cond: str, name: str, value: Any, kind: str | None = None) -> None:
        conds.append(cond)
        params.append(_param(name, value, kind))

    if query.kind == "runs":
        select, time_col = "*", "started_at"
        if query.clients:
            add("EXISTS (SELECT 1 FROM UNNEST(clients) AS c WHERE c IN UNNEST(@clients))", "clients", query.clients)
    else:
        time_col = "bar_time"
        select = ", ".join(map(_q, COLUMNS[query.kind]))
        if query.count_by is not None:
            select = ", ".join([*map(_q, query.count_by), "count(*) AS `count`"])
        for column, values in (("client_id", query.clients), ("strategy_id", query.strategies),
                               ("symbol", query.symbols)):
            if values:
                add(f"{column} IN UNNEST(@{column})", column, values)
        if query.start is not None:  # the partition column: only the range's partitions are read
            add("bar_time > @start", "start", query.start, "TIMESTAMP")
        if query.end is not None:
            add("bar_time <= @end", "end", query.end, "TIMESTAMP")
        if query.since is not None:
            add("generated_at >= @since", "since", query.since, "TIMESTAMP")
    if query.modes:
        add("mode IN UNNEST(@modes)", "modes", query.modes)
    if query.run_id is not None:
        add("run_id = @run_id", "run_id", query.run_id)
    return select_sql(query, select, source, conds, time_col, _q), params
