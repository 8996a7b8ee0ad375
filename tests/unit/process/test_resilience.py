"""Supervision that survives its own stalls and a full disk: a real manager and fleet (mock inference)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.unit.process.test_manager import (BEA_BTC, ODUM_BTC, client_yaml, make_root, managers,  # noqa: F401
                                             pids, start, until)


def test_a_manager_stopped_longer_than_the_threshold_kills_no_healthy_worker(tmp_path: Path, managers) -> None:
    # a manager SIGSTOPped past heartbeat_threshold_s killed every healthy worker when it resumed
    # (18 of 18): the heartbeats travel through its own writer, so they froze with it
    root = make_root(tmp_path, {"odum": client_yaml("odum", ["BTCUSD", "SOLUSD"]),
                                "bea": client_yaml("bea", ["BTCUSD", "ETHUSD"])}, heartbeat_threshold_s=4.0)
    m = start(managers, root)
    m.wait_states("RUNNING", count=4)
    before = pids(m)
    os.kill(m.pid, signal.SIGSTOP)
    time.sleep(9)  # the stall itself: over 2 x the threshold
    os.kill(m.pid, signal.SIGCONT)
    deadline = time.monotonic() + 8  # two thresholds after the resume: a condemned worker would be dead
    while time.monotonic() < deadline:
        assert not [e for e in m.query("SELECT * FROM events WHERE kind = 'heartbeat'")], m.output()[-2000:]
        time.sleep(0.2)
    rows = m.instances()
    assert {w: r["pid"] for w, r in rows.items()} == before
    assert all(r["state"] == "RUNNING" and r["restarts"] == 0 for r in rows.values()), rows
    assert "the manager did not run for" in m.output()
    # a worker that really stops beating is still caught, one threshold after the manager could see it
    os.kill(before[ODUM_BTC], signal.SIGSTOP)
    until(lambda: any(e["kind"] == "heartbeat" for e in m.events(ODUM_BTC)), 15, lambda: m.events(ODUM_BTC))
    m.wait_states({ODUM_BTC: "RUNNING", BEA_BTC: "RUNNING"}, timeout=30)
    assert pids(m)[ODUM_BTC] != before[ODUM_BTC] and pids(m)[BEA_BTC] == before[BEA_BTC]
    assert m.stop() == 0
