"""Worker states: every legal transition, every illegal one, after_exit's table, backoff growth."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from signalgen.errors import SignalgenError
from signalgen.process.states import (
    PROCESS_STATES,
    TRANSIENT_EXIT,
    TRANSITIONS,
    InvalidTransition,
    State,
    WorkerProcess,
    after_exit,
    backoff_delay,
)

S = State
LEGAL = sorted((a, b) for a, targets in TRANSITIONS.items() for b in targets)
ILLEGAL = sorted((a, b) for a, b in itertools.product(State, State) if b not in TRANSITIONS[a])


def at(state: State, **fields) -> WorkerProcess:
    proc = WorkerProcess("ikenna.swing_high_v1.BTCUSD.5m", **fields)
    proc.state = state  # set directly: the test fixes the starting point
    return proc


def test_states_are_the_eight_names() -> None:
    assert [s.value for s in State] == ["STARTING", "RUNNING", "PAUSED", "BACKOFF", "STOPPING", "STOPPED",
                                        "EXITED", "FATAL"]
    assert set(TRANSITIONS) == set(State)
    assert WorkerProcess("w").state is State.STOPPED


def test_the_transition_table() -> None:
    # written out once more by hand: a change to TRANSITIONS must be a deliberate change here too
    assert TRANSITIONS == {
        S.STOPPED: {S.STARTING},
        S.STARTING: {S.RUNNING, S.STOPPING, S.EXITED, S.BACKOFF, S.PAUSED, S.STOPPED, S.FATAL},
        S.RUNNING: {S.STOPPING, S.EXITED, S.BACKOFF, S.PAUSED, S.STOPPED, S.FATAL},
        S.BACKOFF: {S.STARTING, S.STOPPED, S.PAUSED},
        S.STOPPING: {S.STOPPED, S.PAUSED},
        S.PAUSED: {S.STARTING, S.STOPPED},
        S.EXITED: {S.STARTING},
        S.FATAL: {S.STARTING},
    }
    # every state can be left and reached again: nothing is a dead end the manager cannot leave
    assert all(TRANSITIONS[s] for s in State)
    assert {b for targets in TRANSITIONS.values() for b in targets} == set(State)


@pytest.mark.parametrize(("old", "new"), LEGAL, ids=[f"{a}->{b}" for a, b in LEGAL])
def test_legal_transition_is_allowed(old: State, new: State) -> None:
    proc = at(old, state_since=0.0)
    assert proc.change(new, 123.5, "why") == (old, new)
    assert (proc.state, proc.state_since, proc.reason) == (new, 123.5, "why")


@pytest.mark.parametrize(("old", "new"), ILLEGAL, ids=[f"{a}->{b}" for a, b in ILLEGAL])
def test_illegal_transition_raises_and_changes_nothing(old: State, new: State) -> None:
    proc = at(old, state_since=1.0, reason="before")
    with pytest.raises(InvalidTransition, match=f"{old} -> {new} is not a legal transition"):
        proc.change(new, 2.0, "after")
    assert (proc.state, proc.state_since, proc.reason) == (old, 1.0, "before")
    assert issubclass(InvalidTransition, SignalgenError)


def test_a_worker_lifecycle() -> None:
    proc = WorkerProcess("w", state_since=0.0)
    steps = [S.STARTING, S.RUNNING, S.BACKOFF, S.STARTING, S.RUNNING, S.STOPPING, S.STOPPED, S.STARTING,
             S.RUNNING, S.EXITED, S.STARTING, S.FATAL, S.STARTING, S.RUNNING]
    for t, new in enumerate(steps, start=1):
        proc.change(new, float(t))
    assert (proc.state, proc.state_since) == (S.RUNNING, float(len(steps)))


# ---------------------------------------------------------------- after_exit


@pytest.mark.parametrize("policy", ["restart", "pause", "stop"])
@pytest.mark.parametrize("code", [0, 1, 2, -9, -15, 75])
def test_stopping_ends_stopped_whatever_the_code(policy: str, code: int) -> None:
    assert after_exit(at(S.STOPPING, failures=9), code, policy=policy, max_attempts=1) is S.STOPPED


def test_a_pause_ends_paused_and_the_next_stop_is_a_stop_again() -> None:
    proc = at(S.RUNNING)
    proc.stop_target = S.PAUSED
    proc.change(S.STOPPING, 1.0, "pause")
    assert after_exit(proc, -15, policy="restart", max_attempts=5) is S.PAUSED
    proc.change(S.PAUSED, 2.0)
    assert proc.stop_target is S.STOPPED
    proc.change(S.STARTING, 3.0, "resume")
    proc.change(S.STOPPING, 4.0, "stop")
    assert after_exit(proc, 0, policy="restart", max_attempts=5) is S.STOPPED


@pytest.mark.parametrize("policy", ["restart", "pause", "stop"])
@pytest.mark.parametrize("state", [S.STARTING, S.RUNNING])
def test_config_error_exit_2_is_fatal_under_every_policy(policy: str, state: State) -> None:
    assert after_exit(at(state, failures=0), 2, policy=policy, max_attempts=100) is S.FATAL


@pytest.mark.parametrize("policy", ["restart", "pause", "stop"])
@pytest.mark.parametrize("state", [S.STARTING, S.RUNNING])
def test_exit_0_is_exited(policy: str, state: State) -> None:
    assert after_exit(at(state, failures=4), 0, policy=policy, max_attempts=5) is S.EXITED


@pytest.mark.parametrize(("policy", "expected"), [("restart", S.BACKOFF), ("pause", S.PAUSED), ("stop", S.STOPPED)])
@pytest.mark.parametrize("code", [1, -9, -11, 137])
@pytest.mark.parametrize("state", [S.STARTING, S.RUNNING])
def test_failure_follows_the_policy(policy: str, expected: State, code: int, state: State) -> None:
    assert after_exit(at(state), code, policy=policy, max_attempts=5) is expected


@pytest.mark.parametrize("policy", ["restart", "pause", "stop"])
@pytest.mark.parametrize("failures", [0, 5, 99])
@pytest.mark.parametrize("state", [S.STARTING, S.RUNNING])
def test_a_transient_exit_backs_off_under_every_policy_and_never_goes_fatal(policy: str, failures: int,
                                                                            state: State) -> None:
    # exit 75 (TransientError: disk full, store or broker away) counted as a crash: a few seconds of
    # ENOSPC made the whole fleet FATAL
    assert after_exit(at(state, failures=failures), TRANSIENT_EXIT, policy=policy, max_attempts=5) is S.BACKOFF


def test_every_change_is_an_event_for_the_listeners() -> None:
    seen = []
    proc = at(S.STOPPED)
    proc.listeners.append(seen.append)
    proc.pid, proc.restarts = 42, 3
    proc.change(S.STARTING, 10.0, "start")
    proc.exit_code = -9
    proc.change(S.BACKOFF, 11.0, "killed by SIGKILL")
    assert [(e.old, e.new, e.at, e.reason, e.pid, e.exit_code, e.restarts) for e in seen] == [
        (S.STOPPED, S.STARTING, 10.0, "start", 42, None, 3), (S.STARTING, S.BACKOFF, 11.0, "killed by SIGKILL", 42, -9, 3)]
    assert seen[1].detail() == {"from": "STARTING", "to": "BACKOFF", "reason": "killed by SIGKILL", "pid": 42,
                                "exit_code": -9, "restarts": 3, "failures": 0}
    with pytest.raises(InvalidTransition):
        proc.change(S.RUNNING, 12.0)
    assert len(seen) == 2  # a refused move tells nobody


@pytest.mark.parametrize(("failures", "max_attempts", "expected"), [
    (0, 5, S.BACKOFF), (4, 5, S.BACKOFF), (5, 5, S.FATAL), (9, 5, S.FATAL), (0, 0, S.FATAL), (0, 1, S.BACKOFF),
    (1, 1, S.FATAL)])
def test_backoff_to_fatal_after_max_attempts(failures: int, max_attempts: int, expected: State) -> None:
    assert after_exit(at(S.RUNNING, failures=failures), 1, policy="restart", max_attempts=max_attempts) is expected


def test_restart_policy_reaches_fatal_after_exactly_max_attempts_restarts() -> None:
    """The manager's loop: a worker that always crashes is restarted max_attempts times, then FATAL."""
    proc, now, starts = WorkerProcess("w"), 0.0, 0
    proc.change(S.STARTING, now)
    while True:
        starts += 1
        new = after_exit(proc, -9, policy="restart", max_attempts=3)
        proc.failures += 1
        proc.change(new, now)
        if new is S.FATAL:
            break
        proc.change(S.STARTING, now)
    assert (starts, proc.failures, proc.state) == (4, 4, S.FATAL)  # the first start + 3 restarts


@pytest.mark.parametrize("state", sorted(set(State) - PROCESS_STATES))
def test_no_process_no_exit(state: State) -> None:
    with pytest.raises(InvalidTransition, match="no process can exit"):
        after_exit(at(state), 1, policy="restart", max_attempts=5)


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="'retry' is not one of restart, pause, stop"):
        after_exit(at(S.RUNNING), 1, policy="retry", max_attempts=5)


def test_every_after_exit_result_is_a_legal_move() -> None:
    for state, code, policy, failures in itertools.product(
            PROCESS_STATES, [0, 1, 2, -9], ["restart", "pause", "stop"], [0, 5]):
        proc = at(state, failures=failures)
        for target in (S.STOPPED, S.PAUSED):
            proc.stop_target = target
            assert after_exit(proc, code, policy=policy, max_attempts=5) in TRANSITIONS[state]


# ---------------------------------------------------------------- backoff


def test_backoff_doubles_then_caps() -> None:
    assert [backoff_delay(n, 1.0, 60.0) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert [backoff_delay(n, 0.5, 3.0) for n in range(1, 5)] == [0.5, 1.0, 2.0, 3.0]
    assert backoff_delay(0, 1.0, 60.0) == 1.0  # below 1 counts as the first failure
    assert backoff_delay(10_000, 1.0, 60.0) == 60.0  # no float overflow


@given(st.integers(1, 10_000), st.floats(0.001, 100), st.floats(0.001, 10_000))
def test_backoff_is_monotone_and_bounded(failures: int, initial: float, maximum: float) -> None:
    maximum = max(maximum, initial)
    delay = backoff_delay(failures, initial, maximum)
    assert initial <= delay <= maximum
    assert backoff_delay(failures + 1, initial, maximum) >= delay
