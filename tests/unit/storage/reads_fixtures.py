"""Functions that run in a child process for the read tests (module level so `spawn` can import them)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path

from tests.unit.outputs.factories import START, rejection_frame, signal_frame

RUN_ID = "20250301T000000Z-feedc0de"


def fill_store(store) -> None:
    """12 historical signals of ikenna, 4 mock signals of odum, 6 rejections of ikenna, one finished run.

    The rejections are of the 3 bar times after the signals' 6: the store keeps one current decision
    per bar, so a rejection of a signal's bar would replace that signal.
    """
    from signalgen.storage.base import RunRecord

    store.write_signals(signal_frame(12, run_id=RUN_ID))
    store.write_signals(signal_frame(4, client_id="odum", strategy_id="momentum_v1", mode="mock", run_id=RUN_ID))
    store.write_rejections(rejection_frame(6, seed=1, start=START + timedelta(minutes=30), run_id=RUN_ID))
    t = datetime(2025, 3, 1, tzinfo=UTC)
    store.start_run(RunRecord(run_id=RUN_ID, config_hash="abc", mode="historical", environment="local-dev",
                              start=t, end=t, started_at=t, clients=["ikenna", "odum"]))
    store.finish_run(RUN_ID, status="ok", bars=1234567, signals=16, rejections=6, elapsed_s=2.5,
                     rejections_by_reason={"below_confidence": 5, "no_consensus": 1})


def hold_and_serve(db_path: str, events: Queue, stop: Event, more: Event | None = None) -> None:
    """Open the store as a run does, write rows, serve reads and keep the lock until `stop`.

    When `more` is set, 2 more ikenna signals are written (bars after the first ones), once.
    """
    from signalgen.storage.duckdb import DuckDBStore

    with DuckDBStore(Path(db_path)) as store:
        fill_store(store)
        with store.serve_reads() as sock:
            events.put(("serving", str(sock)))
            while not stop.wait(0.05):
                if more is not None and more.is_set():
                    more.clear()
                    store.write_signals(signal_frame(2, start=datetime(2024, 1, 3, tzinfo=UTC) + timedelta(hours=1),
                                                     run_id="later"))
                    events.put(("wrote", ""))
    events.put(("closed", ""))
