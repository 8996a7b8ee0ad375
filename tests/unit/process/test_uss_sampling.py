"""The manager's sampler reads USS (smaps_rollup, expensive) only in turn, on an RSS move, or when
RSS is over the limit; the cheap RSS every round."""

from __future__ import annotations

import os
from types import SimpleNamespace

import psutil

from signalgen.process.manager import _UssCache


class FakeProcess:
    def __init__(self, pid: int, uss_mb: float) -> None:
        self.pid, self.uss_mb, self.reads = pid, uss_mb, 0

    def memory_full_info(self):
        self.reads += 1
        return SimpleNamespace(uss=self.uss_mb * 2**20, rss=2 * self.uss_mb * 2**20)


def cache_period(rounds: int) -> float:
    """The sampling period at which each worker's USS is read in turn every `rounds` rounds."""
    return _UssCache.REFRESH_S / rounds


def test_uss_is_read_in_turn_on_rss_moves_and_when_forced():
    cache = _UssCache(period_s=cache_period(rounds=12))  # each worker in turn every 12 rounds
    procs = [FakeProcess(pid, 20.0) for pid in range(1, 25)]
    for p in procs:  # first sight: read
        assert cache.uss(p, 40.0) == 20.0
    for _ in range(12):  # 12 rounds of 2 (24 workers / 12): each read once more
        due = cache.due([p.pid for p in procs])
        assert len(due) == 2
        for p in procs:
            cache.uss(p, 40.0, force=p.pid in due)
    assert [p.reads for p in procs] == [2] * 24
    p = procs[0]
    p.uss_mb = 30.0
    assert cache.uss(p, 41.0) == 20.0  # RSS within the slack: the last reading
    assert cache.uss(p, 60.0) == 30.0  # RSS moved: read again
    p.uss_mb = 31.0
    assert cache.uss(p, 60.0, force=True) == 31.0  # over the limit: always read
    cache.forget({2, 3})
    assert cache.due([1, 2, 3]) <= {2, 3}


def test_a_real_process_reads_its_uss():
    cache = _UssCache(period_s=5.0)
    me = psutil.Process(os.getpid())
    uss = cache.uss(me, me.memory_info().rss / 2**20)
    assert 0 < uss <= me.memory_info().rss / 2**20 + 1
