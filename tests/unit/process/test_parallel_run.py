"""`run_mode(..., processes=N)`: historical workers in N processes, one writer: the store, the CSV
files and the stream hold exactly what the serial run writes."""

from __future__ import annotations

from datetime import datetime, timezone

from signalgen.modes import run_mode

from .conftest import config, make_root, stored
from .test_worker_process import outputs

END = datetime(2025, 1, 3, tzinfo=timezone.utc)


def test_a_run_in_worker_processes_writes_what_the_serial_run_writes(tmp_path):
    parallel, serial = make_root(tmp_path / "parallel", ("christian", "odum")), make_root(tmp_path / "serial", ("christian", "odum"))
    a = run_mode(config(parallel, "historical", END), processes=2)
    b = run_mode(config(serial, "historical", END))
    assert a.status == b.status == "ok" and a.totals == b.totals and a.totals["signals"] > 0
    assert a.completed == b.completed and len(a.completed) == 5
    for table in ("signals", "rejections"):
        mine, theirs = stored(parallel, table), stored(serial, table)
        assert mine.height > 0 and mine.equals(theirs), table
    (csv, lines), (csv_serial, lines_serial) = outputs(parallel, "historical"), outputs(serial, "historical")
    assert csv and csv == csv_serial
    assert lines.height > 0 and lines.equals(lines_serial)
