"""`recorder --env cloud-dev`: the Pub/Sub decision host on its own (what the Kubernetes recorder
Deployment and a supervisord host run). Worker processes without a manager publish; it stores in
BigQuery what a local-dev historical run stores over the same bars. Before, the command built the Redis
recorder whatever the messaging and failed on cloud-dev."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from polars.testing import assert_frame_equal

import pytest

from tests.integration.cloud.conftest import cli
from tests.integration.cloud.test_cloud_dev import RANGE, decisions, wait_for
from tests.roots import REPO

pytestmark = pytest.mark.integration  # the Pub/Sub and BigQuery emulators

WORKERS = ("odum.momentum_v1.BTCUSD.5m", "odum.momentum_v1.SOLUSD.5m")


def test_the_recorder_alone_stores_what_workers_without_a_manager_publish(cloud):
    done = cli(cloud, "run", "--env", "local-dev", "--mode", "historical", "--client", "odum", *RANGE)
    assert done.returncode == 0, done.stderr[-2000:]
    want = {kind: decisions(cloud, "local-dev", kind, "odum").drop("mode") for kind in ("signals", "rejections")}
    env = {**os.environ, **cloud["vars"], "PYTHONPATH": str(REPO)}

    def process(*args: str, out: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(REPO / "strategy_runner.py"), *args, "--env", "cloud-dev",
                                 "--mode", "simulation", "--root", str(cloud["root"])], cwd=cloud["root"], env=env,
                                stdout=(cloud["root"] / out).open("ab"), stderr=subprocess.STDOUT)

    recorder = process("recorder", out="recorder.out")
    workers = []
    try:
        wait_for(lambda: "recording mode simulation" in (cloud["root"] / "recorder.out").read_text()
                 or recorder.poll() is not None, 120, "the recorder's subscriptions")
        assert recorder.poll() is None, (cloud["root"] / "recorder.out").read_text()[-3000:]
        workers = [process("worker", "--id", w, out=f"{w}.out") for w in WORKERS]
        wait_for(lambda: all(decisions(cloud, "cloud-dev", kind, "odum").height >= want[kind].height
                             for kind in want), 240, "the workers' decisions in BigQuery")
    finally:
        for p in workers:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            p.wait(timeout=60)
        recorder.send_signal(signal.SIGTERM)
        recorder.wait(timeout=120)
    assert recorder.returncode == 0, (cloud["root"] / "recorder.out").read_text()[-3000:]
    for kind, rows in want.items():
        got = decisions(cloud, "cloud-dev", kind, "odum")
        assert set(got["mode"]) == {"simulation"}
        assert_frame_equal(got.drop("mode"), rows)
