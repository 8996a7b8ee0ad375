"""A worker (re)started while Redis is down waits for it (STARTING, heartbeating) instead of going
FATAL as if its configuration were wrong; the fleet is RUNNING again once Redis is back."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.integration.redis.helpers import wait_for
from tests.integration.redis.servers import RedisServer
from tests.integration.redis.test_live_start import ODUM_SOL, live_root, start_live, workers  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration


def test_a_worker_restarted_while_redis_is_down_waits_for_it(live_root: Path, redis_server) -> None:
    # it exited 2 ("cannot reach Redis ... is the URL right?") and went FATAL under every policy
    root = live_root
    manager = start_live(root)
    back = None
    try:
        wait_for(lambda: len(w := workers(root)) == 4 and all(x["state"] == "RUNNING" for x in w.values()), 120,
                 "4 RUNNING live workers", interval=0.5)
        port, folder = redis_server.port, redis_server.folder
        redis_server.stop()
        os.kill(workers(root)[ODUM_SOL]["pid"], signal.SIGKILL)  # restarted by the manager into the outage
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            state = workers(root)[ODUM_SOL]
            assert state["state"] not in ("FATAL", "STOPPED", "PAUSED"), (state, (root / "manager.out").read_text()[-3000:])
            time.sleep(0.5)
        back = RedisServer(folder, port).start()
        wait_for(lambda: all(x["state"] == "RUNNING" for x in workers(root).values()), 60,
                 "all workers RUNNING again", interval=0.5)
        assert workers(root)[ODUM_SOL]["restarts"] >= 1
    finally:
        manager.send_signal(signal.SIGTERM)
        manager.wait(60)
        if back is not None:  # the server this test started again: stopped by PID, as the fixture's
            back.stop()
