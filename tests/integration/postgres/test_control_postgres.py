"""The PostgreSQL control store's own rules, on the real server, each test in a database of its own:
schema creation by several managers at once, leases (refusal, overlap, takeover after a kill -9,
loss), commands claimed FOR UPDATE SKIP LOCKED and fanned out per shard (each row run exactly once),
the spool mirrored in the tick's transaction and seeded back, and a store that goes down and returns.
(The contract shared with SQLite: tests/unit/storage/test_control.py, over both backends.)"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from signalgen.config.models import EnvironmentConfig
from signalgen.errors import ConfigError, SignalgenError, StorageError
from signalgen.storage.control import ControlStore, LeaseLost, control_for, spool_path
from signalgen.storage.control.postgres import PostgresControlStore
from tests.postgres import PrivateServer
from tests.roots import REPO

psycopg = pytest.importorskip("psycopg", reason="the postgres extra is not installed")


def query(dsn: str, sql: str, *args) -> list[dict]:
    from psycopg.rows import dict_row

    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as con:
        cur = con.execute(sql, args)
        return cur.fetchall() if cur.description else []


def env_config(**control) -> EnvironmentConfig:
    return EnvironmentConfig.model_validate({
        "name": "pgtest", "storage": {"type": "duckdb", "path": "x.duckdb"}, "messaging": {"type": "local", "path": "s"},
        "control": {"type": "postgres", "path": "var/pgtest/control.sqlite", **control}})


def test_the_dsn_comes_from_the_variable_the_yaml_names_and_its_absence_is_a_config_error(tmp_path: Path,
                                                                                         monkeypatch) -> None:
    monkeypatch.delenv("SIGNALGEN_CONTROL_DSN", raising=False)
    with pytest.raises(ConfigError, match="SIGNALGEN_CONTROL_DSN") as err:
        control_for(env_config(), tmp_path)
    assert err.value.field == "control.dsn_env"
    monkeypatch.setenv("MY_DSN", "host=127.0.0.1 user=postgres password=s3cret dbname=x")
    store = control_for(env_config(dsn_env="MY_DSN", lease_ttl_s=3), tmp_path, shard=(1, 3))
    assert isinstance(store, PostgresControlStore) and store.lease_ttl_s == 3
    assert store.path == tmp_path / "var/pgtest/control.shard-1-of-3.sqlite"  # the shard's own spool
    assert "s3cret" not in store.where and "s3cret" not in repr(store)
    assert spool_path(tmp_path / "c.sqlite", (0, 1)) == tmp_path / "c.sqlite"


def _open_at_once(dsn: str, barrier, errors) -> None:
    try:
        barrier.wait(30)
        PostgresControlStore(dsn).submit("stop")
    except BaseException as exc:  # noqa: BLE001
        errors.put(repr(exc))


def test_managers_creating_the_schema_at_once_do_not_race(pg_dsn: str) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier, errors = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_open_at_once, args=(pg_dsn, barrier, errors)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert errors.empty() and [p.exitcode for p in procs] == [0] * 6, errors.get() if not errors.empty() else ""
    assert len(query(pg_dsn, "SELECT id FROM strategy_commands")) == 6


def _holder(dsn: str, shard: tuple[int, int], ttl: float, ready) -> None:
    store = PostgresControlStore(dsn, lease_ttl_s=ttl)
    with store.hold(shard, f"run-{os.getpid()}"):
        ready.set()
        while True:
            store.record([], [])  # renews the lease, as the manager's tick does
            time.sleep(0.2)


def test_a_live_lease_refuses_a_second_manager_and_another_layout_and_is_taken_over_after_a_kill(pg_dsn: str,
                                                                                                 tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_holder, args=(pg_dsn, (0, 3), 2.0, ready))
    holder.start()
    try:
        assert ready.wait(30)
        second = PostgresControlStore(pg_dsn, lease_ttl_s=2.0)
        with pytest.raises(SignalgenError, match=rf"a manager \(pid {holder.pid} on .*\) already holds shard 0/3 "):
            with second.hold((0, 3), "second"):
                pass
        with pytest.raises(SignalgenError, match="shard 0/2 overlaps the live lease of shard 0/3"):
            with second.hold((0, 2), "second"):
                pass
        with second.hold((1, 3), "other-shard"):  # the same layout's other shards are free
            assert {x["shard"] for x in second.leases() if x["live"]} == {"0/3", "1/3"}
        # a command the holder claimed and never finished (it is about to die)
        cid = query(pg_dsn, "INSERT INTO strategy_commands (command, shard, claimed_by, strategy_id) "
                            "VALUES ('pause', '0/3', 'run-dead', 'x') RETURNING id")[0]["id"]
        time.sleep(1.0)  # renewed meanwhile: still refused, well after the first TTL started
        with pytest.raises(SignalgenError, match="already holds shard 0/3"):
            with second.hold((0, 3), "second"):
                pass
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)
        killed = time.monotonic()
        while True:
            try:
                with second.hold((0, 3), "second"):
                    took = time.monotonic() - killed
                    [lease] = [x for x in second.leases() if x["shard"] == "0/3"]
                    assert (lease["run_id"], lease["pid"], lease["live"]) == ("second", os.getpid(), True)
                break
            except SignalgenError:
                assert time.monotonic() - killed < 10
                time.sleep(0.2)
        assert 1.0 < took < 3.5, took  # after the TTL (2 s) from the last renewal, not before
        assert second.command(cid).status == "failed"
        assert "stopped before finishing it" in second.command(cid).result["error"]
        assert second.leases() == []  # released when the manager stops
    finally:
        if holder.is_alive():
            holder.kill()


def test_a_manager_whose_lease_was_taken_over_gets_lease_lost(pg_dsn: str) -> None:
    stalled, other = PostgresControlStore(pg_dsn, lease_ttl_s=2.0), PostgresControlStore(pg_dsn, lease_ttl_s=2.0)
    with stalled.hold((0, 1), "stalled"):
        stalled.record([], [])
        time.sleep(2.2)  # SIGSTOPped, partitioned: no renewal for longer than the TTL
        stalled.record([], [])  # nobody took it meanwhile: renewed again
        time.sleep(2.2)
        with other.hold((0, 1), "other"):
            with pytest.raises(LeaseLost, match="shard 0/1 .* was taken over by pid"):
                stalled.record([{"id": "w", "state": "RUNNING"}], [])
            assert query(pg_dsn, "SELECT id FROM strategy_instances") == []  # the tick's rows rolled back with it


def _claimer(dsn: str, shard: tuple[int, int], stop, ran) -> None:
    store = PostgresControlStore(dsn, lease_ttl_s=30)
    with store.hold(shard, f"claimer-{shard[0]}"):
        while not stop.is_set():
            store.record([], [])
            for command in store.pending():
                ran.put((shard[0], command.id, command.parameters["n"]))
                store.complete(command.id, {"by": shard[0]})
            time.sleep(0.01)
        for command in store.pending():
            ran.put((shard[0], command.id, command.parameters["n"]))
            store.complete(command.id, {"by": shard[0]})


def test_every_row_is_fanned_out_once_and_each_shards_child_runs_exactly_once(pg_dsn: str) -> None:
    submitter = PostgresControlStore(pg_dsn)
    submitter.pending()  # the schema
    ctx = multiprocessing.get_context("fork")
    stop, ran = ctx.Event(), ctx.Queue()
    claimers = [ctx.Process(target=_claimer, args=(pg_dsn, (i, 2), stop, ran)) for i in range(2)]
    for p in claimers:
        p.start()
    deadline = time.monotonic() + 30
    while len([x for x in submitter.leases() if x["live"]]) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    parents = [submitter.submit("pause", "a.*", {"n": n}) for n in range(150)]  # while both claim
    with psycopg.connect(pg_dsn, autocommit=True) as con:  # and rows any program inserts
        parents += [con.execute("INSERT INTO strategy_commands (strategy_id, command, parameters_json) VALUES "
                                "('b.*', 'pause', %s) RETURNING id", (f'{{"n": {n}}}',)).fetchone()[0]
                    for n in range(150, 200)]
    while query(pg_dsn, "SELECT id FROM strategy_commands WHERE status = 'pending'"):
        assert time.monotonic() < deadline, "commands still pending"
        time.sleep(0.1)
    stop.set()
    for p in claimers:
        p.join(30)
    runs = [ran.get(timeout=5) for _ in range(ran.qsize())]
    assert sorted((shard, n) for shard, _, n in runs) == sorted((s, n) for s in (0, 1) for n in range(200))
    assert len({cid for _, cid, _ in runs}) == 400  # no row twice
    for parent in parents:
        cmd = submitter.command(parent)
        assert cmd.status == "completed" and set(cmd.result["children"]) == {"0/2", "1/2"}, cmd
        children = query(pg_dsn, "SELECT shard, status, result_json FROM strategy_commands WHERE parent_id = %s "
                                 "ORDER BY shard", parent)
        assert [(c["shard"], c["status"], c["result_json"]) for c in children] == [
            ("0/2", "completed", '{"by": 0}'), ("1/2", "completed", '{"by": 1}')]


def test_a_hostile_row_fails_alone_before_it_is_fanned_out(pg_dsn: str) -> None:
    store = PostgresControlStore(pg_dsn)
    with store.hold((0, 1), "run"):
        bad = query(pg_dsn, "INSERT INTO strategy_commands (strategy_id, command, parameters_json) VALUES "
                            "('x', 'pause', %s) RETURNING id", "[" * 5000 + "]" * 5000)[0]["id"]
        good = store.submit("pause", "x")
        [claimed] = store.pending()
        assert store.command(good).result == {"children": {"0/1": claimed.id}}
        failed = store.command(bad)
        assert failed.status == "failed" and "nests deeper than 32 levels" in failed.result["error"]
        assert query(pg_dsn, "SELECT count(*) AS n FROM strategy_commands WHERE parent_id = %s", bad)[0]["n"] == 0
        assert [c.id for c in store.pending()] == [claimed.id]  # claimed by this run until it is done
        store.complete(claimed.id, {})
        assert store.pending() == []


def test_the_spool_is_mirrored_in_the_ticks_transaction_and_seeds_a_manager_on_another_node(pg_dsn: str,
                                                                                          tmp_path: Path) -> None:
    node_a = PostgresControlStore(pg_dsn, spool=ControlStore(tmp_path / "a.sqlite"))
    worker = ControlStore(node_a.path)  # what a worker process writes: the spool, never PostgreSQL
    point = datetime(2025, 1, 1, 0, 5, tzinfo=timezone.utc)
    with node_a.hold((0, 1), "run-a"):
        for n in range(50):
            worker.heartbeat(f"c.s.S{n}.5m", pid=100 + n, state="RUNNING", last_bar_time=point, checkpoint=point,
                             signals=n, rejections=0, errors=0, ready=True)
            worker.save_worker_state("mock", f"c.s.S{n}.5m", point, [b'{"bar": %d}' % n])
        assert query(pg_dsn, "SELECT count(*) AS n FROM heartbeats")[0]["n"] == 0  # not yet: at the tick
        node_a.record([{"id": "c.s.S0.5m", "state": "RUNNING"}], [])
        beats = {r["worker_id"]: r for r in query(pg_dsn, "SELECT * FROM heartbeats")}
        assert len(beats) == 50 and beats["c.s.S7.5m"]["signals"] == 7 and beats["c.s.S7.5m"]["pid"] == 107
        assert len(query(pg_dsn, "SELECT * FROM worker_state")) == 50
        assert node_a._spool_changes() == ([], [])  # nothing changed: the next tick writes no heartbeat
        worker.save_worker_state("mock", "c.s.S3.5m", point + timedelta(minutes=5), [b'{"bar": "new"}'])
        beats, states = node_a._spool_changes()
        assert beats == [] and [s[1] for s in states] == ["c.s.S3.5m"]
        node_a.record([], [])
    # node A is gone; a manager of the shard starts on node B with an empty spool
    node_b = PostgresControlStore(pg_dsn, spool=ControlStore(tmp_path / "b.sqlite"))
    with node_b.hold((0, 1), "run-b"):
        assert node_b.worker_state("mock", "c.s.S3.5m") == (point + timedelta(minutes=5), [b'{"bar": "new"}'])
        assert node_b.worker_state("mock", "c.s.S9.5m") == (point, [b'{"bar": 9}'])
        assert len(ControlStore(node_b.path).worker_states_since("")) == 50


def test_a_store_that_goes_down_is_a_storage_error_and_the_same_object_resumes_when_it_returns(
        tmp_path: Path) -> None:
    server = PrivateServer().init()
    try:
        store = PostgresControlStore(server.dsn, spool=ControlStore(tmp_path / "spool.sqlite"),
                                     connect_timeout_s=2, lease_ttl_s=30)
        with store.hold((0, 1), "run"):
            store.record([{"id": "w", "state": "RUNNING"}], [])
            store.ping()
            server.stop()
            ControlStore(store.path).heartbeat("w", pid=1, state="RUNNING", last_bar_time=None, checkpoint=None,
                                               signals=5, rejections=0, errors=0, ready=True)
            for call in (store.ping, lambda: store.record([], [("2025-01-01T00:00:00.000Z", "w", "k", "d")]),
                         store.pending, store.instances):
                start = time.monotonic()
                with pytest.raises(StorageError, match=r"^control store postgresql://postgres@127.0.0.1:\d+/postgres: "):
                    call()
                assert time.monotonic() - start < 5
            assert store.heartbeats()["w"]["signals"] == 5  # the manager still judges its workers
            server.start()
            store.record([], [("2025-01-01T00:00:00.000Z", "w", "k", "after")])
            store.ping()
            assert query(server.dsn, "SELECT signals FROM heartbeats")[0]["signals"] == 5  # mirrored on return
            assert [e["detail"] for e in store.events()] == ["after"]
    finally:
        server.remove()
