"""Read queries: filters by time range, strategy, symbol and mode; the socket takes specs, never SQL."""

from __future__ import annotations

import socket
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from signalgen.errors import StorageError
from signalgen.storage.duckdb import DuckDBStore
from signalgen.storage.reads import ReadQuery
from signalgen.storage.readserver import socket_path
from tests.unit.outputs.factories import START
from tests.unit.storage.reads_fixtures import RUN_ID, fill_store


@pytest.fixture
def store(tmp_path):
    with DuckDBStore(tmp_path / "signals.duckdb") as s:
        fill_store(s)
        yield s


def _rows(store, **spec):
    return store.read(ReadQuery(**spec)).to_dicts()


def read(path, query):
    """What the `signals` command does: an unopened store reads through the holder, or the file."""
    return DuckDBStore(path).read(query)


def test_filters_select_what_they_name(store):
    assert len(_rows(store, kind="signals")) == 16
    mock = _rows(store, kind="signals", modes=("mock",))
    assert len(mock) == 4 and {r["client_id"] for r in mock} == {"odum"}
    assert {r["mode"] for r in _rows(store, kind="signals", clients=("ikenna",))} == {"historical"}
    assert {r["symbol"] for r in _rows(store, kind="signals", symbols=("MSFT",))} == {"MSFT"}
    assert _rows(store, kind="signals", strategies=("nope",)) == []
    assert len(_rows(store, kind="rejections")) == 6
    assert _rows(store, kind="runs", clients=("odum",))[0]["run_id"] == RUN_ID
    assert _rows(store, kind="runs", clients=("someone",)) == []


def test_time_range_is_start_exclusive_end_inclusive_like_a_run(store):
    # ikenna: 12 signals over 6 bar times (2 symbols) from START, 5 minutes apart
    rows = _rows(store, kind="signals", clients=("ikenna",), start=START, end=START + timedelta(minutes=10))
    assert sorted({r["bar_time"] for r in rows}) == [START + timedelta(minutes=5), START + timedelta(minutes=10)]
    assert len(rows) == 4


def test_newest_and_limit(store):
    rows = _rows(store, kind="signals", clients=("ikenna",), newest=True, limit=3)
    assert [r["bar_time"] for r in rows] == [START + timedelta(minutes=25)] * 2 + [START + timedelta(minutes=20)]
    ids = [r["signal_id"] for r in rows]
    assert all(isinstance(i, str) and len(i) == 36 for i in ids)  # canonical UUID text


def test_count_by_groups_what_the_rows_hold_also_through_the_holder(store, tmp_path):
    rows = _rows(store, kind="signals", count_by=("client_id", "mode"))
    assert rows == [{"client_id": "ikenna", "mode": "historical", "count": 12},
                    {"client_id": "odum", "mode": "mock", "count": 4}]
    assert _rows(store, kind="rejections", count_by=()) == [{"count": 6}]
    # the filters apply before counting: ikenna's 2 symbols over the 2 bars in (START, START + 10m]
    assert _rows(store, kind="signals", clients=("ikenna",), start=START, end=START + timedelta(minutes=10),
                 count_by=("symbol",)) == [{"symbol": "AAPL", "count": 2}, {"symbol": "MSFT", "count": 2}]
    assert _rows(store, kind="signals", clients=("nobody",), count_by=("client_id",)) == []
    with store.serve_reads():  # another process's read goes through the holder
        assert read(store.path, ReadQuery(kind="signals", count_by=())).to_dicts() == [{"count": 16}]
    with pytest.raises(ValidationError):
        ReadQuery(kind="runs", count_by=())
    with pytest.raises(ValidationError):
        ReadQuery(kind="signals", count_by=("generated_at",))


def test_a_query_spec_refuses_sql_and_unknown_keys():
    with pytest.raises(ValidationError):
        ReadQuery.model_validate_json('{"kind": "signals; DROP TABLE signals"}')
    with pytest.raises(ValidationError):
        ReadQuery.model_validate_json('{"kind": "signals", "sql": "DROP TABLE signals"}')
    with pytest.raises(ValidationError):
        ReadQuery(kind="signals", symbols=("x" * 201,))


def _raw(path, payload: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(path))
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: s.recv(65536), b""))


def test_server_answers_bad_requests_with_one_line_and_keeps_serving(store):
    with store.serve_reads() as path:
        bad = _raw(path, b'{"kind": "signals", "sql": "DROP TABLE signals"}')
        assert bad.startswith(b"Ebad read query") and b"\n" not in bad
        try:  # the server stops reading at 64 KiB: the sender sees the answer or a reset
            assert _raw(path, b"x" * 200_000) == b"Erequest larger than 65536 bytes"
        except (ConnectionResetError, BrokenPipeError):
            pass
        # the same process asks its own socket: the answer is the stored rows
        df = read(store.path, ReadQuery(kind="signals", modes=("historical",)))
        assert df.height == 12 and set(df["mode"]) == {"historical"}
    assert not path.exists()  # removed when serving ends
    assert store.count("signals") == 16


def test_a_stale_socket_file_is_replaced_and_ignored_by_readers(store, tmp_path):
    path = socket_path(store.path)
    path.write_text("left by a killed run")
    with store.serve_reads():
        assert read(store.path, ReadQuery(kind="runs")).height == 1
    path.write_text("left again")
    store.close()
    assert read(store.path, ReadQuery(kind="runs")).height == 1  # no listener: the file, read-only


def test_long_paths_get_a_socket_in_the_temp_folder(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "signals.duckdb"
    path = socket_path(deep)
    assert path.parent != deep.parent and path.name.startswith("signalgen-")
    assert socket_path(deep) == path  # writer and reader agree
    with DuckDBStore(deep) as s:
        fill_store(s)
        with s.serve_reads() as served:
            assert served == path
            assert read(deep, ReadQuery(kind="signals")).height == 16


def test_a_missing_store_is_one_clear_error(tmp_path):
    with pytest.raises(StorageError, match="no signal store at .*nothing.duckdb; run"):
        read(tmp_path / "nothing.duckdb", ReadQuery(kind="signals"))


def test_a_file_that_is_not_a_store_is_one_clear_error(tmp_path):
    path = tmp_path / "junk.duckdb"
    path.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(StorageError, match="junk.duckdb"):
        read(path, ReadQuery(kind="signals"))


def test_times_come_back_in_utc(store):
    row = _rows(store, kind="signals", limit=1)[0]
    assert row["bar_time"].tzinfo is not None and row["bar_time"].utcoffset() == timedelta(0)
    assert row["bar_time"] == datetime(2024, 1, 2, 14, 30, tzinfo=UTC)
