"""WriterServer + RemoteSink: worker processes hand their decisions to the one writer of the store.

Several forkserver worker processes -> one WriterServer -> DuckDB hold exactly what one in-process
historical run computes over the same bars; a failed commit acks nothing; the key is checked; the
in-flight window bounds what a worker has outstanding.
"""

from __future__ import annotations

import os
import struct
import time
from datetime import datetime, timezone
from itertools import chain

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signalgen.data.validation import validate_bars
from signalgen.errors import ConfigError, TransientError
from signalgen.modes import run_mode
from signalgen.config.workers import history_bars
from signalgen.modes.sources import bar_chunks
from signalgen.modes.worker import ReplayClock, WorkerContext, bar_feed, run_worker
from signalgen.transports.local import RemoteSink

from .conftest import Fleet, config, make_root, stored, wait_for

END = datetime(2025, 1, 2, tzinfo=timezone.utc)  # 288 five-minute bars per worker


def test_worker_processes_store_the_decisions_of_one_historical_run(tmp_path, short_dir):
    """3 simulation workers in processes -> writer == `run --mode historical` in this process, bit for bit."""
    root = make_root(tmp_path / "fleet")
    fleet = Fleet(config(root, "simulation", END), short_dir / "w.sock")
    try:
        fleet.start_all()
        codes = fleet.join_all()
        checkpoints = fleet.server.checkpoints
    finally:
        fleet.close()
    assert codes == {wid: 0 for wid in fleet.specs} and len(codes) == 3
    assert checkpoints == {wid: END for wid in fleet.specs}

    twin = make_root(tmp_path / "twin")
    report = run_mode(config(twin, "historical", END))
    assert report.status == "ok" and report.totals["signals"] > 0
    for table in ("signals", "rejections"):
        mine, theirs = stored(root, table), stored(twin, table)
        assert mine.height > 0 and mine.equals(theirs), table
    assert stored(root, "signals").height + stored(root, "rejections").height == 3 * 288


def _replay(fleet: Fleet, spec, sink: RemoteSink, stop_after: int | None = None):
    """Run one worker in this thread through `sink` (simulation feed), optionally only its first bars."""
    cfg, need = fleet.cfg, history_bars(spec)
    frames = bar_chunks(cfg, spec.symbol, spec.timeframe, 1000, history=need)
    history = validate_bars(next(frames), spec.timeframe).bars.tail(need)
    feed = bar_feed(chain([history], frames))
    if stop_after is not None:
        feed = (bar for i, bar in enumerate(feed) if i < need + stop_after)
    ctx = WorkerContext(str(fleet.root / "registry"), "onnx", datetime.now(timezone.utc), "simulation",
                        sink.run_id, cfg.start)
    return run_worker(spec, feed, sink, ReplayClock(), ctx)


def test_a_failed_commit_acks_nothing_and_the_worker_resumes_from_its_old_checkpoint(tmp_path, short_dir,
                                                                                   monkeypatch):
    root = make_root(tmp_path)
    fleet = Fleet(config(root, "simulation", END), short_dir / "w.sock")
    try:
        spec = next(iter(fleet.specs.values()))
        first = RemoteSink(fleet.address, fleet.authkey, spec)
        assert first.resume_point(spec.id) is None and first.run_id == "test-run"
        _replay(fleet, spec, first, stop_after=50)
        good = first.flush(timeout=30)[spec.id]
        first.close()

        # the next commit fails in the store: the worker is told, and its checkpoint stays
        original = fleet.store.write_decisions
        monkeypatch.setattr(fleet.store, "write_decisions",
                            lambda *a: (_ for _ in ()).throw(OSError("disk full (injected)")))
        second = RemoteSink(fleet.address, fleet.authkey, spec)
        assert second.resume_point(spec.id) == good
        with pytest.raises(TransientError, match="disk full"):
            _replay(fleet, spec, second)
            second.flush(timeout=30)
        assert second.checkpoints == {spec.id: good}
        second.abort()
        assert fleet.server.checkpoints[spec.id] == good and fleet.store.checkpoints("simulation")[spec.id] == good

        # the store works again: a new incarnation resumes after the old checkpoint and completes
        monkeypatch.setattr(fleet.store, "write_decisions", original)
        third = RemoteSink(fleet.address, fleet.authkey, spec)
        assert third.resume_point(spec.id) == good
        _replay(fleet, spec, third)
        assert third.flush(timeout=30) == {spec.id: END}
        third.close()
    finally:
        fleet.close()


def test_a_wrong_key_is_refused(tmp_path, short_dir):
    fleet = Fleet(config(make_root(tmp_path), "simulation", END), short_dir / "w.sock")
    try:
        spec = next(iter(fleet.specs.values()))
        with pytest.raises(ConfigError, match="rejected this worker's key"):
            RemoteSink(fleet.address, b"x" * 32, spec, connect_timeout_s=5)
        RemoteSink(fleet.address, fleet.authkey, spec).close()  # the writer still serves the others
    finally:
        fleet.close()


def test_a_worker_of_another_mode_is_refused(tmp_path, short_dir):
    root = make_root(tmp_path)
    fleet = Fleet(config(root, "simulation", END), short_dir / "w.sock")
    try:
        from signalgen.config.workers import worker_specs

        mock_spec = worker_specs(config(root, "mock", END))[0]
        with pytest.raises(ConfigError, match="runs mode 'mock'"):
            RemoteSink(fleet.address, fleet.authkey, mock_spec)
    finally:
        fleet.close()


def test_in_flight_batches_are_bounded(tmp_path, short_dir):
    """A writer slower than the worker: the worker never has more than max_in_flight batches out."""
    fleet = Fleet(config(make_root(tmp_path), "simulation", END), short_dir / "w.sock", commit_interval_s=0.3)
    try:
        spec = next(iter(fleet.specs.values()))
        sink = RemoteSink(fleet.address, fleet.authkey, spec, max_in_flight=2, max_pending_bars=16)
        most = [0]
        original = sink._pump

        def watched(final=False):
            original(final)
            most[0] = max(most[0], len(sink._in_flight))
        sink._pump = watched
        outcome = _replay(fleet, spec, sink)
        sink.close(timeout=30)
        assert outcome.bars == 288 and sink.checkpoints == {spec.id: END}
        assert most[0] == 2  # the window filled and never overflowed
        assert len(sink.ack_latencies) < 288  # bars travelled in batches, not one by one
    finally:
        fleet.close()


def test_one_reader_serves_every_connection_a_silent_or_replaced_one_holds_up_no_other(tmp_path, short_dir):
    """The writer reads every worker's connection on one thread: a client that connects and says
    nothing does not hold up the others; a worker that connects again replaces its old connection
    (whose next send fails), and the workers' batches of one window are committed as one group."""
    import socket

    fleet = Fleet(config(make_root(tmp_path), "simulation", END), short_dir / "w.sock", commit_interval_s=2.0)
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        silent.connect(fleet.address)  # never answers the challenge
        specs = list(fleet.specs.values())
        sinks = [RemoteSink(fleet.address, fleet.authkey, spec, connect_timeout_s=5) for spec in specs]
        for spec, sink in zip(specs, sinks):
            _replay(fleet, spec, sink, stop_after=1)  # one bar each, within one commit window
        assert [s.flush(timeout=30) for s in sinks] == [{spec.id: sink.checkpoints[spec.id]} for spec, sink in
                                                        zip(specs, sinks)]
        assert fleet.server.stats["batches"] == len(specs) == 3
        assert fleet.server.stats["groups"] == 1  # the reader woke the commit thread once for the group

        again = RemoteSink(fleet.address, fleet.authkey, specs[0], connect_timeout_s=5)
        assert again.resume_point(specs[0].id) == sinks[0].checkpoints[specs[0].id]
        with pytest.raises(TransientError):  # the old connection was ended by the writer
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                _replay(fleet, specs[0], sinks[0], stop_after=1)
                sinks[0].flush(timeout=5)
        _replay(fleet, specs[0], again, stop_after=2)
        again.close(timeout=30)
        wait_for(lambda: fleet.server.connected() == sorted(s.id for s in specs[1:]), 5, "the bye of one worker")
        for sink in sinks[1:]:
            sink.close(timeout=30)
        wait_for(lambda: fleet.server.connected() == [], 5, "every worker gone")
    finally:
        silent.close()
        fleet.close()


def test_a_worker_stopped_in_the_middle_of_a_message_holds_up_no_other(tmp_path, short_dir):
    """`pause` SIGSTOPs a worker, possibly half-way through sending a batch: the writer's one reader
    must not wait for the rest. Half a message from one worker, then another worker's batch is
    acked; the first one's rest arrives later and its batch is acked too."""
    import pickle

    from signalgen.signals.records import Records

    fleet = Fleet(config(make_root(tmp_path), "simulation", END), short_dir / "w.sock", commit_interval_s=0.05)
    first, second = list(fleet.specs.values())[:2]
    stalled = RemoteSink(fleet.address, fleet.authkey, first, connect_timeout_s=5)
    other = RemoteSink(fleet.address, fleet.authkey, second, connect_timeout_s=5)
    try:
        message = pickle.dumps(("batch", 1, Records([], []), None))
        frame = struct.pack("!i", len(message)) + message
        os.write(stalled._conn.fileno(), frame[: len(frame) // 2])  # stopped here
        _replay(fleet, second, other, stop_after=3)
        assert other.flush(timeout=10) == {second.id: other.checkpoints[second.id]}  # not held up
        os.write(stalled._conn.fileno(), frame[len(frame) // 2:])
        stalled._in_flight[1] = time.monotonic()
        stalled._seq = 1
        wait_for(lambda: (stalled.read_answers(), not stalled._in_flight)[1], 10, "the stalled batch's ack")
        stalled.close(timeout=10)
        other.close(timeout=10)
    finally:
        stalled.abort()  # a reader stuck on the half message would wait for its end forever
        other.abort()
        fleet.close()


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 200_000), min_size=1, max_size=6), cuts=st.lists(st.integers(1, 90_000), max_size=12),
       big_header=st.booleans())
def test_inbound_cuts_messages_from_any_split_of_the_stream(sizes, cuts, big_header):
    """The reader's framing: messages of any size, the stream split at any points, the long header
    form (-1, then an 8-byte length) included, come out whole and in order; a closed peer is EOF."""
    from signalgen.transports.local import _Inbound

    messages = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    stream = b"".join((struct.pack("!i", -1) + struct.pack("!Q", len(m)) if big_header else struct.pack("!i", len(m)))
                      + m for m in messages)
    r, w = os.pipe()
    inbound, got, pos = _Inbound(), [], 0
    try:
        for cut in cuts + [len(stream)]:
            piece = stream[pos:pos + cut]
            pos += len(piece)
            while piece:
                sent = os.write(w, piece[:60_000])  # a pipe holds 64 KiB: feed it, read it
                piece = piece[sent:]
                while _readable(r):
                    got += inbound.read(r)
        os.close(w)
        w = -1
        with pytest.raises(EOFError):
            while True:
                got += inbound.read(r)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    assert got == messages


def _readable(fd: int) -> bool:
    import select

    return bool(select.select([fd], [], [], 0)[0])


def test_frames_travel_as_arrow_ipc_and_arrive_equal():
    import pickle

    import polars as pl
    from polars.testing import assert_frame_equal

    from signalgen.transports.local import Frames
    from tests.unit.outputs.factories import rejection_frame, signal_frame

    for frames in (Frames(signal_frame(70), rejection_frame(90)), Frames(signal_frame(0), rejection_frame(3))):
        back = pickle.loads(pickle.dumps(frames))
        for sent, got in zip(frames.frames(), back.frames()):
            assert got.schema == sent.schema
            assert_frame_equal(got, sent)
        assert back.bars == frames.bars and back.last_bar_time == frames.last_bar_time
    assert b"_frames_from_ipc" in pickle.dumps(frames)  # Arrow IPC, not pickled polars frames
    assert isinstance(back.signals, pl.DataFrame)


def test_the_writer_relays_heartbeats_and_a_late_one_never_replaces_a_final_state(tmp_path, short_dir):
    """A worker's beat travels on its writer connection into the control store; one relayed after the
    same process wrote its final state directly (it left meanwhile) does not bring RUNNING back."""
    from signalgen.storage.control import ControlStore

    from tests.polling import wait_for

    root = make_root(tmp_path)
    control_path = str(tmp_path / "control.sqlite")
    fleet = Fleet(config(root, "simulation", END), short_dir / "w.sock", control_path=control_path)
    control = ControlStore(control_path)
    beat = dict(pid=4242, state="RUNNING", last_bar_time=None, checkpoint=None, signals=3, rejections=1,
                errors=0, ready=True)
    try:
        spec = next(iter(fleet.specs.values()))
        sink = RemoteSink(fleet.address, fleet.authkey, spec)
        assert sink.relays_heartbeats
        assert sink.send_heartbeat({**beat, "ts": "2026-01-01T00:00:01.000Z"})
        wait_for(lambda: control.heartbeats().get(spec.id), 10, "the relayed heartbeat")
        got = control.heartbeats()[spec.id]
        assert (got["pid"], got["state"], got["signals"], got["ready"], got["ts"]) == \
            (4242, "RUNNING", 3, True, "2026-01-01T00:00:01.000Z")

        # the process left: its final beat is written directly; a beat still in flight arrives after it
        control.heartbeat(spec.id, **{**beat, "state": "STOPPED", "ts": "2026-01-01T00:00:03.000Z"})
        control.relay_heartbeats({spec.id: {**beat, "ts": "2026-01-01T00:00:02.000Z"}})
        assert control.heartbeats()[spec.id]["state"] == "STOPPED"
        # a new process (another pid) is relayed over the old one's final state
        control.relay_heartbeats({spec.id: {**beat, "pid": 4243, "ts": "2026-01-01T00:00:04.000Z"}})
        assert (control.heartbeats()[spec.id]["pid"], control.heartbeats()[spec.id]["state"]) == (4243, "RUNNING")
        sink.close(timeout=10)
        assert not sink.send_heartbeat(beat)  # closed: the worker writes the control store itself
    finally:
        control.close()
        fleet.close()


def test_a_writer_without_a_control_store_relays_no_heartbeat(tmp_path, short_dir):
    root = make_root(tmp_path)
    fleet = Fleet(config(root, "simulation", END), short_dir / "w.sock")
    try:
        sink = RemoteSink(fleet.address, fleet.authkey, next(iter(fleet.specs.values())))
        assert not sink.relays_heartbeats and not sink.send_heartbeat({"state": "RUNNING"})
        sink.close(timeout=10)
    finally:
        fleet.close()
