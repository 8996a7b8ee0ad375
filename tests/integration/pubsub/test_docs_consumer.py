"""The consumer docs/cloud.md prints ("A consumer in 30 lines"), run exactly as printed against the
emulator: it receives what PubSubOutput publishes, skips copies and older revisions, reports
retractions, and acks everything it handled."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import polars as pl
import pytest

from signalgen.brokers.pubsub import Pull
from signalgen.outputs.pubsub import PubSubOutput
from signalgen.signals.types import stream_rows
from tests.integration.pubsub.helpers import signals
from tests.integration.pubsub.servers import PROJECT
from tests.polling import wait_for
from tests.roots import REPO

pytestmark = pytest.mark.integration


def snippet() -> str:
    """The first python block after the heading "### A consumer in 30 lines" of docs/cloud.md."""
    text = (REPO / "docs" / "cloud.md").read_text()
    section = text.split("### A consumer in 30 lines", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.splitlines()) <= 35, "the docs promise about 30 lines"
    return code


def revised(frame: pl.DataFrame, revision: int, retracted: bool = False, weight: float | None = None) -> pl.DataFrame:
    rows = stream_rows(frame).with_columns(pl.lit(revision, pl.Int32).alias("revision"), pl.lit(retracted).alias("retracted"))
    return rows if weight is None else rows.with_columns(pl.lit(weight).alias("weight"))


def test_the_documented_consumer_runs_as_printed(emulator_host, cloud_cfg, tmp_path):
    out = PubSubOutput.from_config(cloud_cfg, "odum")
    out.open()  # creates odum's subscription, as `clients grant` does
    frame = signals("odum", "momentum_v1", "BTCUSD", 3)
    s0, s1, s2 = (frame.slice(i, 1) for i in range(3))
    steps = [revised(s0, 0), revised(s1, 0), revised(s0, 0),                  # s0 again: a copy
             revised(s1, 1, weight=0.25), revised(s2, 0), revised(s2, 1, retracted=True),
             revised(s1, 0)]                                                  # late: an older revision
    for step in steps:  # one flush each: a flush sends a signal once
        out.write(step)
        out.flush()
    stdout = tmp_path / "consumer.out"
    env = {**os.environ, "GOOGLE_CLOUD_PROJECT": PROJECT, "SIGNALS_SUBSCRIPTION": out.subscription}
    with stdout.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-c", snippet()], env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: len(stdout.read_text().splitlines()) >= 5 or proc.poll() is not None, 60, "5 lines")
        time.sleep(1.5)  # room for a wrong sixth line (a copy or the late revision) to show
        assert proc.poll() is None, stdout.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    ids = frame["signal_id"].to_list()
    times = [t.strftime("%Y-%m-%dT%H:%M:%S.000000Z") for t in frame["bar_time"]]
    assert stdout.read_text().splitlines() == [
        f"{times[0]} BTCUSD 1 0.1 0",
        f"{times[1]} BTCUSD 1 0.1 0",
        f"{times[1]} BTCUSD 1 0.25 1",
        f"{times[2]} BTCUSD 1 0.1 0",
        f"withdrawn {ids[2]} {times[2]} BTCUSD",
    ]
    reader = Pull(PROJECT, out.subscription)  # it acked everything it handled: nothing is left
    assert reader.pull_raw(10, timeout_s=3) == []
    reader.close()
    out.close()
