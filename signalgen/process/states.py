"""Worker states and every legal move between them, in one place (after Supervisor's states.py/process.py).

The manager keeps one `WorkerProcess` per worker and changes its state only through
`WorkerProcess.change`, which refuses any move not in `TRANSITIONS`. What happens when a worker's
process ends is decided by `after_exit` alone, so the supervision rules can be read and tested here:

    STOPPED --start--> STARTING --ready--> RUNNING --exit 0--> EXITED
                          |                   |
                          +----- failure -----+--> BACKOFF --delay over--> STARTING
                          |   (policy)        +--> PAUSED  --resume-----> STARTING
                          |                   +--> STOPPED
                          |                   +--> FATAL   (exit 2, or restarts exhausted)
                          +--stop--> STOPPING --exit--> STOPPED (or its stop_target)
                          +--pause (SIGSTOP)--> PAUSED --resume (SIGCONT)--> STARTING

A running process exists only in STARTING, RUNNING and STOPPING (`PROCESS_STATES`). BACKOFF,
STOPPED, EXITED and FATAL have none. PAUSED has a frozen one after a `pause` command (the manager
SIGSTOPs it; `resume` SIGCONTs it and it goes through STARTING until its next ready heartbeat) and
none after the `pause` recovery policy (`resume` starts one, which continues after its checkpoint).
A worker killed for a failure (stale heartbeat, over memory) is killed without entering STOPPING, so `after_exit` applies its recovery policy.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from signalgen.errors import SignalgenError


class State(StrEnum):
    STARTING = "STARTING"  # process started, not yet reported ready
    RUNNING = "RUNNING"  # ready (feed and models loaded): taking bars
    PAUSED = "PAUSED"  # frozen by SIGSTOP (a pause command) or without a process (pause policy); waits for `resume`
    BACKOFF = "BACKOFF"  # no process; restarts when backoff_until has passed
    STOPPING = "STOPPING"  # asked to stop (SIGTERM); SIGKILL after stop_timeout_s
    STOPPED = "STOPPED"  # no process; stopped on purpose (or never started)
    EXITED = "EXITED"  # no process; ended by itself with exit 0 (its range is done)
    FATAL = "FATAL"  # no process; will not be restarted (config error, or restarts exhausted)


_FAILED = (State.BACKOFF, State.PAUSED, State.STOPPED, State.FATAL)  # where a failure can lead (policy)

TRANSITIONS: dict[State, frozenset[State]] = {
    State.STOPPED: frozenset({State.STARTING}),
    State.STARTING: frozenset({State.RUNNING, State.STOPPING, State.EXITED, *_FAILED}),
    State.RUNNING: frozenset({State.STOPPING, State.EXITED, *_FAILED}),
    # no process in BACKOFF: stop and pause take effect at once
    State.BACKOFF: frozenset({State.STARTING, State.STOPPED, State.PAUSED}),
    State.STOPPING: frozenset({State.STOPPED, State.PAUSED}),
    State.PAUSED: frozenset({State.STARTING, State.STOPPED}),
    State.EXITED: frozenset({State.STARTING}),
    State.FATAL: frozenset({State.STARTING}),  # only a manual start (which resets failures)
}

PROCESS_STATES = frozenset({State.STARTING, State.RUNNING, State.STOPPING})  # a live process exists
POLICIES = ("restart", "pause", "stop")
CONFIG_ERROR_EXIT = 2  # ConfigError.exit_code: restarting cannot help
TRANSIENT_EXIT = 75  # TransientError.exit_code (EX_TEMPFAIL): a resource was away; retry, never FATAL


class InvalidTransition(SignalgenError):
    """A state change not in TRANSITIONS: a bug in the manager, never an operator error."""


@dataclass(frozen=True)
class StateEvent:
    """One change of a worker's state (after Supervisor's ProcessStateEvent): what `change` emits to
    the listeners, and what the control store's `events` (kind `state`), `status` and metrics read."""

    worker_id: str
    old: State
    new: State
    at: float  # time.time()
    reason: str
    pid: int | None
    exit_code: int | None
    restarts: int
    failures: int

    def detail(self) -> dict:
        """The event as the control store keeps it (JSON in `events.detail`)."""
        return {"from": self.old.value, "to": self.new.value, "reason": self.reason, "pid": self.pid,
                "exit_code": self.exit_code, "restarts": self.restarts, "failures": self.failures}


Listener = Callable[[StateEvent], None]


@dataclass(eq=False)
class WorkerProcess:
    """Everything the manager knows about one worker (one OS process at a time), as Supervisor keeps
    everything about a program in its `Subprocess`: nothing about a worker lives anywhere else.

    `failures` counts consecutive failures (reset by the manager when RUNNING lasted longer than
    backoff_max_s, or on a manual start); `transient` counts consecutive exits for a transient cause
    (TRANSIENT_EXIT: a store, broker or disk that was not there), which never use up `failures`;
    `restarts` counts every restart. `stop_target` is where STOPPING ends: STOPPED for a stop, PAUSED
    for a pause (set it before changing to STOPPING). Every `change` emits a `StateEvent` to
    `listeners`.
    """

    worker_id: str
    spec: Any = None  # its WorkerSpec
    state: State = State.STOPPED
    pid: int | None = None
    started_at: float | None = None  # time.time() of the current process's start
    state_since: float = field(default_factory=time.time)
    restarts: int = 0
    failures: int = 0
    transient: int = 0
    backoff_until: float | None = None
    exit_code: int | None = None
    reason: str = ""
    stop_target: State = State.STOPPED
    # the process and what the manager is doing to it
    handle: Any = field(default=None, repr=False)  # multiprocessing.Process while one runs
    kill_reason: str | None = None  # killed by the manager: why (its exit is a failure with this reason)
    stop_deadline: float | None = None  # STOPPING: SIGKILL after this time
    then: str | None = None  # once the process stopped: "start" (a restart) or "remove" (gone by reload)
    alive_at: float = 0.0  # last proof of life: start, resume, or a fresh heartbeat
    errors: deque = field(default_factory=deque, repr=False)  # (heartbeat ts, errors) of the last minute
    unhealthy: bool = False
    listeners: list[Listener] = field(default_factory=list, repr=False)

    @property
    def running(self) -> bool:
        """A process of this worker exists (it may be paused)."""
        return self.handle is not None

    def change(self, new: State, now: float, reason: str = "") -> tuple[State, State]:
        """Move to `new` if TRANSITIONS allows it and tell the listeners; returns (old, new). Raises
        InvalidTransition."""
        old = self.state
        if new not in TRANSITIONS[old]:
            raise InvalidTransition(f"worker {self.worker_id}: {old} -> {new} is not a legal transition "
                                    f"(from {old}: {', '.join(sorted(TRANSITIONS[old])) or 'nothing'})")
        if old is State.STOPPING:
            self.stop_target = State.STOPPED  # one stop_target per stop
        self.state, self.state_since, self.reason = new, now, reason
        event = StateEvent(self.worker_id, old, new, now, reason, self.pid, self.exit_code, self.restarts,
                           self.failures)
        for listener in self.listeners:
            listener(event)
        return old, new


def backoff_delay(failures: int, initial: float, maximum: float) -> float:
    """Seconds to wait before restart number `failures` (1, 2, ...): initial, 2x, 4x ... capped at maximum.

    `failures` below 1 counts as 1. The exponent is bounded so huge counts cannot overflow a float.
    """
    exponent = min(max(failures, 1) - 1, 64)
    return min(initial * 2.0 ** exponent, maximum)


def after_exit(proc: WorkerProcess, exit_code: int, *, policy: str, max_attempts: int) -> State:
    """The state a worker goes to when its process ended with `exit_code` (negative: killed by a signal).

    STOPPING -> its stop_target (STOPPED, or PAUSED for a pause); exit 2 (ConfigError) -> FATAL under
    every policy; exit 0 -> EXITED; TRANSIENT_EXIT (a store, broker or disk that was away) -> BACKOFF
    under every policy and whatever the count: waiting is the cure, not a human; anything else is a
    failure, handled by the strategy's recovery policy: "pause" -> PAUSED, "stop" -> STOPPED,
    "restart" -> BACKOFF, or FATAL when this failure (failures + 1) is more than `max_attempts`.
    Pure: the manager applies the result with `change` and counts failures itself.
    """
    if policy not in POLICIES:
        raise ValueError(f"recovery policy {policy!r} is not one of {', '.join(POLICIES)}")
    if proc.state not in PROCESS_STATES:
        raise InvalidTransition(f"worker {proc.worker_id}: no process can exit in state {proc.state}")
    if proc.state is State.STOPPING:
        return proc.stop_target
    if exit_code == CONFIG_ERROR_EXIT:
        return State.FATAL
    if exit_code == 0:
        return State.EXITED
    if exit_code == TRANSIENT_EXIT:
        return State.BACKOFF
    if policy == "pause":
        return State.PAUSED
    if policy == "stop":
        return State.STOPPED
    return State.FATAL if proc.failures + 1 > max_attempts else State.BACKOFF
