"""Helper threads: how they stay out of the way of the thread that runs the models."""

from __future__ import annotations

import os
import threading
from contextlib import suppress


def background_priority(increment: int = 10) -> None:
    """Lower the calling thread's CPU priority (Linux nice is per thread), so helper threads use spare
    cores and never starve the thread that runs the models. A no-op where unsupported."""
    tid = threading.get_native_id()
    with suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + increment, 19))
