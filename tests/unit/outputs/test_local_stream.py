from __future__ import annotations

import json
import os
from datetime import datetime

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from signalgen.errors import StorageError
from signalgen.outputs.base import Output
from signalgen.outputs.local import LocalStreamOutput, content_digests, read_stream, to_json_lines
from tests.unit.outputs.factories import signal_frame


@pytest.fixture
def out(tmp_path):
    o = LocalStreamOutput(tmp_path / "stream", "ikenna", "historical")
    o.open()
    yield o
    o.close()


def test_is_an_output(out):
    assert isinstance(out, Output)


def test_round_trip(out):
    df = signal_frame(25)
    out.write(df)
    out.flush()
    assert out.file.relative_to(out.file.parents[1]).as_posix() == "historical/ikenna.jsonl"
    assert_frame_equal(read_stream(out.file), df)


def test_one_json_object_per_line_with_iso_utc_times(out):
    df = signal_frame(5)
    out.write(df)
    out.flush()
    lines = out.file.read_text().splitlines()
    assert len(lines) == 5
    first = json.loads(lines[0])
    assert list(first) == [*df.columns, "revision", "retracted"]  # a first delivery: revision 0
    assert (first["revision"], first["retracted"]) == (0, False)
    assert first["bar_time"] == "2024-01-02T14:30:00.000000Z"
    assert datetime.fromisoformat(first["generated_at"]) == df["generated_at"][0]
    assert first["models"] == df["models"][0].to_list()
    assert {m["model_id"] for m in first["models"]} == {"gbm_trend", "gbm_revert"}
    assert first["magnitude"] is None  # optional field, present as null


def test_replays_append_only_new_or_changed_signals(tmp_path):
    df = signal_frame(6)
    file = tmp_path / "historical" / "ikenna.jsonl"
    for run in range(4):  # re-runs deliver the same decisions with another run id, latency, time
        o = LocalStreamOutput(tmp_path, "ikenna", "historical")
        o.open()
        o.write(df.with_columns(run_id=pl.lit(f"run-{run}"), latency_us=pl.lit(run, pl.Int64),
                                generated_at=pl.col("generated_at") + pl.duration(seconds=run)))
        o.close()
        if run == 0:
            first = file.read_bytes()
    assert file.read_bytes() == first  # saw 24 lines before the fix
    o = LocalStreamOutput(tmp_path, "ikenna", "historical")
    o.open()
    o.write(df.head(2).with_columns(confidence=pl.lit(0.99)))  # a changed decision is news
    o.write(signal_frame(1, symbols=("TSLA",)))               # and so is a new one
    o.close()
    assert read_stream(file, dedupe=False).height == 9
    assert read_stream(file).filter(pl.col("confidence") == 0.99).height == 2


def test_stream_digests_survive_the_json_round_trip(tmp_path):
    df = signal_frame(2_000, seed=11)  # random floats: the file's text must digest like memory
    o = LocalStreamOutput(tmp_path, "ikenna", "historical")
    o.open()
    o.write(df)
    o.close()
    assert content_digests(read_stream(o.file, dedupe=False)) == content_digests(df)


def test_rows_of_another_mode_are_refused(out):
    with pytest.raises(ValueError, match="mock"):
        out.write(signal_frame(2, mode="mock"))
    out.flush()
    assert out.file.read_bytes() == b""


def test_partial_last_line_is_skipped_and_repaired(tmp_path):
    file = tmp_path / "historical" / "ikenna.jsonl"
    o = LocalStreamOutput(tmp_path, "ikenna", "historical")
    o.open()
    o.write(signal_frame(3))
    o.close()
    with open(file, "ab") as f:  # what a crash mid-append leaves
        f.write(b'{"signal_id":"half')
    assert read_stream(file).height == 3
    o.open()
    o.write(signal_frame(2, seed=3, symbols=("TSLA",)))
    o.close()
    assert all(json.loads(line) for line in file.read_text().splitlines())
    assert read_stream(file).height == 5


def test_other_clients_rows_are_refused(out):
    with pytest.raises(ValueError, match="zara"):
        out.write(signal_frame(2, client_id="zara"))
    out.flush()
    assert out.file.read_bytes() == b""


def test_flush_needs_open(tmp_path):
    o = LocalStreamOutput(tmp_path, "ikenna", "historical")
    o.write(signal_frame(1))
    with pytest.raises(RuntimeError, match="open"):
        o.flush()


def test_missing_or_empty_stream_reads_as_no_signals(tmp_path):
    assert read_stream(tmp_path / "none.jsonl").is_empty()
    assert read_stream(tmp_path / "none.jsonl").schema == signal_frame(0).schema
    assert pl.concat([read_stream(tmp_path / "none.jsonl"), signal_frame(1)]).height == 1


def test_flush_all_writes_what_flushing_each_client_alone_writes(tmp_path, monkeypatch):
    """One polars pass for several clients' streams: the same bytes per file as one flush per
    client, replays still appended only when news, and a file that fails costs the others nothing."""
    clients = ("ada", "bea", "cy")
    batches = {c: signal_frame(7, client_id=c, seed=i) for i, c in enumerate(clients)}
    # the same signal ids in two clients' rows stay two clients' signals
    batches["cy"] = batches["cy"].with_columns(signal_id=batches["bea"]["signal_id"])

    def outputs(folder):
        outs = [LocalStreamOutput(folder, c, "historical") for c in clients]
        for o in outs:
            o.open()
        return outs

    alone, together = outputs(tmp_path / "alone"), outputs(tmp_path / "together")
    for o in alone:
        o.write(batches[o.client_id])
        o.flush()
    for o in together:
        o.write(batches[o.client_id])
    assert LocalStreamOutput.flush_all(together) == []
    for a, t in zip(alone, together):
        assert t.file.read_bytes() == a.file.read_bytes() and read_stream(t.file).height == 7

    # a replay with one changed signal appends one line; bea's fsync fails (cut back), the others land
    for o in together:
        o.write(batches[o.client_id].with_columns(confidence=pl.when(pl.int_range(pl.len()) == 0)
                                                  .then(0.99).otherwise(pl.col("confidence"))))
    bea, fsync = together[1], os.fsync

    def failing_fsync(fd):
        if fd == bea._fd:
            raise OSError(5, "Input/output error (injected)")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    errors = LocalStreamOutput.flush_all(together)
    assert len(errors) == 1 and isinstance(errors[0], StorageError) and "bea.jsonl" in str(errors[0])
    assert [read_stream(o.file, dedupe=False).height for o in together] == [8, 7, 8]
    monkeypatch.setattr(os, "fsync", fsync)
    for o in together:
        o.close()


def test_a_consumer_keeps_the_highest_revision_and_drops_retractions(tmp_path):
    """Before: a correction under the same signal_id carried nothing to order it by, and a retraction
    did not exist: a consumer kept whichever copy came last, and a withdrawn signal for ever."""
    from signalgen.signals.types import stream_rows

    df = signal_frame(4)
    ids = df["signal_id"].to_list()
    one = {i: stream_rows(df.filter(pl.col("signal_id") == i)) for i in ids}
    o = LocalStreamOutput(tmp_path, "ikenna", "historical")
    o.open()
    o.write(df)  # plain signals: first deliveries
    o.flush()
    o.write(pl.concat([one[ids[0]].with_columns(confidence=pl.lit(0.99), revision=pl.lit(1, pl.Int32)),
                       one[ids[1]].with_columns(revision=pl.lit(1, pl.Int32), retracted=pl.lit(True))]))
    o.flush()
    o.write(one[ids[0]])  # a late copy of revision 0 (a replay from an older checkpoint)
    o.write(one[ids[1]].with_columns(revision=pl.lit(1, pl.Int32), retracted=pl.lit(True)))  # already there
    o.close()
    lines = read_stream(o.file, dedupe=False)
    assert lines.select("signal_id", "revision", "retracted").rows() == [
        *[(i, 0, False) for i in ids], (ids[0], 1, False), (ids[1], 1, True), (ids[0], 0, False)]
    current = read_stream(o.file)
    assert current["signal_id"].to_list() == [ids[2], ids[3], ids[0]]
    assert current.filter(pl.col("signal_id") == ids[0])["confidence"].item() == 0.99


def test_lines_from_before_revisions_read_as_first_deliveries(tmp_path):
    file = tmp_path / "historical" / "ikenna.jsonl"
    file.parent.mkdir()
    old = signal_frame(2)
    file.write_bytes(to_json_lines(old))  # the line format before `revision` and `retracted`
    lines = read_stream(file, dedupe=False)
    assert lines["revision"].to_list() == [0, 0] and lines["retracted"].to_list() == [False, False]
    assert_frame_equal(read_stream(file), old)
