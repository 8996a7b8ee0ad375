"""The BigQuery store on the emulator: equal to DuckDB for the same writes, failures that say what to do,
the table layout the issue asks for. (Every protocol method: tests/unit/storage/test_store_contract.py.)"""

from __future__ import annotations

import uuid
from datetime import timedelta

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from signalgen.errors import StorageError, TransientError, is_transient
from signalgen.signals.types import REJECTION_SCHEMA, SIGNAL_SCHEMA
from signalgen.storage.bigquery import BigQueryStore
from signalgen.storage.duckdb import DuckDBStore
from signalgen.storage.reads import ReadQuery
from tests.integration.redis.servers import free_port
from tests.unit.outputs.factories import START, rejection_frame, signal_frame

pytestmark = pytest.mark.integration


@pytest.fixture
def bq(bq_endpoint):
    with BigQueryStore("signalgen-dev", f"t{uuid.uuid4().hex[:12]}", api_endpoint=bq_endpoint) as s:
        yield s


def _batches() -> list[tuple[pl.DataFrame, pl.DataFrame]]:
    """Writes that exercise every rule: fresh bars of two clients, a replay, a changed signal, a bar
    turned rejection, another model version, the same bars in another mode."""
    sig = signal_frame(40, symbols=("AAPL", "MSFT", "BTC-USD"))
    rej = rejection_frame(30, start=START + timedelta(days=2), client_id="odum-x", seed=3)
    other = signal_frame(6, symbols=("ZZZ",), start=START + timedelta(days=400))["signal_id"]
    other_rej = rejection_frame(5, symbols=("ZZZ",), start=START + timedelta(days=400))["rejection_id"]
    return [
        (sig, rej),
        (sig.with_columns(run_id=pl.lit("run-2")), rej),                          # a replay
        (sig.head(5).with_columns(confidence=pl.lit(0.42)), REJECTION_SCHEMA.to_frame()),  # changed
        (SIGNAL_SCHEMA.to_frame(), rejection_frame(4, run_id="run-3")),           # bars turned rejections
        (sig.slice(10, 6).with_columns(other.alias("signal_id"), run_id=pl.lit("run-4")),  # another version
         rej.head(5).with_columns(other_rej.alias("rejection_id"), run_id=pl.lit("run-4"))),
        (sig.with_columns(mode=pl.lit("mock")), rej.with_columns(mode=pl.lit("mock"))),
    ]


def test_the_same_writes_leave_the_same_rows_and_streams_in_duckdb_and_bigquery(bq, tmp_path):
    with DuckDBStore(tmp_path / "s.duckdb") as duck:
        for signals, rejections in _batches():
            a, b = duck.write_decisions(signals, rejections), bq.write_decisions(signals, rejections)
            assert a.rows == b.rows
            order = ["signal_id", "retracted", "mode"]
            assert_frame_equal(a.stream.sort(order), b.stream.sort(order))
        for table in ("signals", "rejections", "superseded_signals", "superseded_rejections"):
            theirs = bq.rows(table)
            ours = duck.query(f"SELECT * FROM {table}").cast(dict(theirs.schema))  # audit ids: UUID -> text
            assert ours.height > 0, table
            assert_frame_equal(ours.sort(ours.columns), theirs.sort(theirs.columns), check_exact=True)
        for query in (ReadQuery(kind="signals"), ReadQuery(kind="rejections", newest=True, limit=7),
                      ReadQuery(kind="signals", count_by=("client_id", "mode", "symbol"))):
            assert_frame_equal(duck.read(query), bq.read(query), check_exact=True)


def test_decision_tables_are_partitioned_by_bar_day_and_clustered_by_strategy_and_symbol(bq):
    bq.write_signals(signal_frame(2))
    table = bq.client.get_table(f"signalgen-dev.{bq.dataset('ikenna')}.signals")
    assert (table.time_partitioning.type_, table.time_partitioning.field) == ("DAY", "bar_time")
    assert table.clustering_fields == ["strategy_id", "symbol"]
    datasets = {d.dataset_id for d in bq.client.list_datasets()}
    assert {bq.dataset("ikenna"), bq.system} <= datasets
    system = {t.table_id for t in bq.client.list_tables(bq.system)}
    assert system == {"runs", "worker_checkpoints", "bar_rejections"}  # the staging table is gone


def test_a_missing_table_is_a_storage_error_naming_it(bq):
    bq.client.delete_table(f"signalgen-dev.{bq.system}.worker_checkpoints")
    with pytest.raises(StorageError, match=rf"cannot write signalgen-dev\.{bq.system}\.worker_checkpoints: ") as e:
        bq.write_checkpoints("mock", {"a": START})
    assert "\n" not in str(e.value) and not is_transient(e.value)


def test_an_unreachable_service_is_a_transient_error():
    store = BigQueryStore("signalgen-dev", "x", api_endpoint=f"http://127.0.0.1:{free_port()}", retry_s=1.0)
    with pytest.raises(TransientError, match=r"BigQuery cannot write signalgen-dev\.x_system now") as e:
        store.open()
    assert is_transient(e.value)


def test_what_counts_as_transient():
    from google.api_core import exceptions as gexc

    from signalgen.storage.bigquery import is_transient as bq_transient

    for exc in (gexc.ServiceUnavailable("down"), gexc.InternalServerError("oops"), gexc.TooManyRequests("slow down"),
                gexc.GatewayTimeout("late"), gexc.RetryError("gave up", ConnectionRefusedError()),
                gexc.BadRequest("Transaction is aborted due to concurrent update"), TimeoutError()):
        assert bq_transient(exc), exc
    for exc in (gexc.NotFound("no table"), gexc.BadRequest("Syntax error"), gexc.Forbidden("Access Denied")):
        assert not bq_transient(exc), exc
