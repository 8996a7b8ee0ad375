from __future__ import annotations

import pytest
from polars.testing import assert_frame_equal

from signalgen.errors import TransientError
from signalgen.outputs.base import Output
from signalgen.outputs.memory import ListOutput
from signalgen.signals.types import SIGNAL_SCHEMA
from tests.unit.outputs.factories import signal_frame


def test_flush_delivers_what_was_written():
    out = ListOutput("ikenna")
    assert isinstance(out, Output)
    out.open()
    assert out.signals.schema == SIGNAL_SCHEMA and out.signals.is_empty()
    a, b = signal_frame(3), signal_frame(2, seed=1, symbols=("TSLA",))
    out.write(a)
    out.write(b)
    assert out.signals.is_empty()  # written is not delivered
    out.flush()
    assert len(out.batches) == 1
    assert_frame_equal(out.signals, a.vstack(b))


def test_failed_flush_delivers_nothing_and_drops_the_pending_batch():
    out = ListOutput("ikenna")
    out.fail_next_flush = 2
    df = signal_frame(4)
    for _ in range(2):
        out.write(df)
        with pytest.raises(TransientError, match="simulated"):
            out.flush()
    assert out.signals.is_empty() and out.fail_next_flush == 0
    out.flush()  # nothing pending any more: the caller must replay
    assert out.signals.is_empty()
    out.write(df)
    out.flush()
    assert_frame_equal(out.signals, df)


def test_close_flushes_and_other_clients_are_refused():
    out = ListOutput("ikenna")
    with pytest.raises(ValueError, match="zara"):
        out.write(signal_frame(1, client_id="zara"))
    out.write(signal_frame(2))
    out.close()
    assert out.closed and out.signals.height == 2
