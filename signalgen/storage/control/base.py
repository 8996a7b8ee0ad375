"""What every control store shares: the protocol the manager, CLI, workers and transports use
(`ControlStoreProtocol`), the `Command` row, the bounds on hostile rows and their parsing, and the
timestamp format. The backends (sqlite.py, postgres.py) keep the same tables and the same rules.

Timestamps are ISO 8601 UTC text with milliseconds, `2026-11-26T15:20:11.123Z`, in both backends:
readable in `sqlite3` and `psql`, sortable as text. `iso()` / `epoch()` convert.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from signalgen.errors import StorageError
from signalgen.logs import excerpt

if TYPE_CHECKING:
    from signalgen.config.models import RunConfig

class ControlStoreCorrupt(StorageError):
    """The control store's file is not a SQLite database (overwritten, truncated, damaged)."""


# Bounds on a `strategy_commands` row, which any program may write: every field is hostile input.
# A row outside them fails with a short reason (docs/control.md); it never reaches the manager's logic.
MAX_PARAMETERS_BYTES = 64 * 1024  # parameters_json, UTF-8
MAX_PARAMETERS_DEPTH = 32  # nesting of arrays and objects in parameters_json
MAX_FIELD_CHARS = 4 * 1024  # any other text field: command, strategy_id, created_at
COMMAND_STATUSES = ("pending", "completed", "failed")

INSTANCE_COLUMNS = ("id", "client", "strategy", "symbol", "timeframe", "mode", "config_hash", "state", "pid",
                    "started_at", "state_since", "restarts", "failures", "exit_code", "reason", "updated_at")
HEARTBEAT_COLUMNS = ("worker_id", "pid", "state", "last_bar_time", "checkpoint", "signals", "rejections",
                     "errors", "ready", "ts", "paused_keys")
TIME_FIELDS = {"started_at", "state_since", "updated_at", "last_bar_time", "checkpoint", "ts",
                "created_at", "processed_at"}

def iso(value: float | datetime) -> str:
    """Epoch seconds or a datetime -> the store's text form, `2026-11-26T15:20:11.123Z` (naive = UTC)."""
    if isinstance(value, datetime):
        dt = value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
    else:
        dt = datetime.fromtimestamp(value, timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def epoch(text: str) -> float:
    """The store's text form (or any ISO 8601 time; no zone = UTC) -> epoch seconds."""
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


def now_iso() -> str:
    return iso(time.time())


def heartbeat_row(worker_id: str, pid: int, state: str, last_bar_time: Any, checkpoint: Any, signals: int,
                   rejections: int, errors: int, ready: bool, ts: str | None = None, paused_keys: int = 0) -> tuple:
    return (worker_id, pid, str(state), time_value(last_bar_time), time_value(checkpoint), signals, rejections,
            errors, int(bool(ready)), ts or now_iso(), int(paused_keys))


def control_path_of(cfg: RunConfig) -> Path:
    """The environment's control store file: `control.path` resolved against the run's root."""
    return Path(cfg.root) / cfg.environment.control.path


def time_value(value: Any) -> Any:
    """A time field as stored: numbers and datetimes become ISO text; text and None stay."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return iso(float(value))
    if isinstance(value, datetime):
        return iso(value)
    return value


@dataclass(frozen=True)
class Command:
    """One `strategy_commands` row. `parameters` and `result` are the decoded JSON columns."""

    id: int
    strategy_id: str | None
    command: str
    parameters: dict
    status: str
    created_at: str
    processed_at: str | None
    result: dict | None


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def json_depth(text: str) -> int:
    """How deep arrays and objects nest in JSON `text`, read without parsing it (so a hostile
    document cannot exhaust the parser's recursion). Brackets inside strings do not count."""
    depth = deepest = 0
    for m in _JSON_BRACKET.finditer(_JSON_STRING.sub("", text)):
        depth += 1 if m.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def parse_parameters(text: Any) -> dict:
    """`parameters_json` as a dict, within MAX_PARAMETERS_BYTES and MAX_PARAMETERS_DEPTH; ValueError
    with a short reason otherwise. NULL or '' is {}."""
    if text is None or text == "":
        return {}
    if not isinstance(text, str):
        raise ValueError(f"parameters_json is {type(text).__name__}, not JSON text")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_PARAMETERS_BYTES:
        raise ValueError(f"parameters_json is {size:,} bytes, over the limit of {MAX_PARAMETERS_BYTES:,}")
    if json_depth(text) > MAX_PARAMETERS_DEPTH:
        raise ValueError(f"parameters_json nests deeper than {MAX_PARAMETERS_DEPTH} levels")
    try:
        params = json.loads(text)
    except (ValueError, RecursionError):
        params = None
    if not isinstance(params, dict):
        raise ValueError(f"parameters_json is not a JSON object: {excerpt(text, 60)}")
    return params


# A command row is read cut to its bounds by SQLite itself (a 1 GB field never reaches Python whole),
# with each column's full length beside it
LIMITS = {"strategy_id": MAX_FIELD_CHARS, "command": MAX_FIELD_CHARS, "created_at": MAX_FIELD_CHARS,
           "processed_at": MAX_FIELD_CHARS, "parameters_json": MAX_PARAMETERS_BYTES, "result_json": 2**20}
BOUNDED_COLUMNS = ", ".join(["id", "status"] + [
    f"substr({c}, 1, {n + 1}) AS {c}, length({c}) AS {c}__chars" for c, n in LIMITS.items()])


def _text(row: Mapping[str, Any], name: str, *, null: bool = True) -> str | None:
    """A text column of a command row, checked: type and MAX_FIELD_CHARS."""
    value = row[name]
    if value is None and null:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name} is {type(value).__name__ if value is not None else 'NULL'}, not text")
    if row[f"{name}__chars"] > MAX_FIELD_CHARS:
        raise ValueError(f"{name} is {row[f'{name}__chars']:,} characters, over the limit of "
                         f"{MAX_FIELD_CHARS:,}: {excerpt(value)}")
    return value


def command_of_row(row: Mapping[str, Any], lenient: bool = False) -> Command:
    """A Command from a row that any program may have written; ValueError with a short reason when a
    field is out of bounds (`lenient`: the row as far as it can be read, for a command already done)."""
    try:
        strategy_id, command = _text(row, "strategy_id"), _text(row, "command", null=False)
        created_at = _text(row, "created_at", null=False)
        try:
            epoch(created_at or "")
        except ValueError:
            raise ValueError(f"created_at is not an ISO 8601 time: {excerpt(created_at)}") from None
        if (row["parameters_json__chars"] or 0) > MAX_PARAMETERS_BYTES:
            raise ValueError(f"parameters_json is {row['parameters_json__chars']:,} characters, over the limit "
                             f"of {MAX_PARAMETERS_BYTES:,} bytes")
        params = parse_parameters(row["parameters_json"])
    except ValueError:
        if not lenient:
            raise
        strategy_id = row["strategy_id"] if isinstance(row["strategy_id"], str) else None
        command, created_at, params = str(row["command"])[:MAX_FIELD_CHARS], str(row["created_at"]), {}
    return Command(id=row["id"], strategy_id=strategy_id, command=command, parameters=params,
                   status=row["status"], created_at=created_at, processed_at=row["processed_at"],
                   result=result_of(row["result_json"]))


def found_command(row: Mapping[str, Any] | None, id: int) -> Command:
    """`command(id)`'s answer from its row (BOUNDED_COLUMNS): KeyError when there is none; a row out of
    bounds (already failed for it when it was pending) as far as it can be read."""
    if row is None:
        raise KeyError(f"no command with id {id}")
    try:
        return command_of_row(row)
    except ValueError:
        return command_of_row(row, lenient=True)


def wait_command(store: Any, id: int, timeout: float, poll_s: float = 0.05) -> Command:
    """The command once it is no longer pending, or as it is after `timeout` seconds (still pending):
    every backend's `wait`."""
    deadline = time.monotonic() + timeout
    while True:
        cmd = store.command(id)
        if cmd.status != "pending" or time.monotonic() >= deadline:
            return cmd
        time.sleep(min(poll_s, max(deadline - time.monotonic(), 0)))


def result_of(text: Any) -> dict | None:
    """result_json as written by the manager (bounded by it); anything else that is there is reported,
    never parsed without bounds."""
    if not text:
        return None
    try:
        if not isinstance(text, str) or json_depth(text) > MAX_PARAMETERS_DEPTH:
            raise ValueError("not JSON text within the nesting limit")
        result = json.loads(text)
        return result if isinstance(result, dict) else {"result": result}
    except (ValueError, RecursionError) as exc:
        return {"error": f"unreadable result_json: {exc}"}


class LeaseLost(StorageError):
    """Another manager took over this manager's shard (its lease expired while it could not renew
    it): the manager stops its workers, which the new holder runs."""


def shard_name(shard: tuple[int, int]) -> str:
    """`i/N`, the name of a shard (and of its lease)."""
    return f"{shard[0]}/{shard[1]}"


class ControlStoreProtocol(Protocol):
    """What the manager, the CLI, workers and transports use of a control store (sqlite.py,
    postgres.py). `path` is a local SQLite file in both: the store itself, or the PostgreSQL store's
    node-local spool where workers write. Every method raises StorageError (one line) when the
    store cannot be reached: callers treat it as transient."""

    path: Path
    shared: bool  # several managers (one lease per shard) rather than one (a file lock)
    events_keep: int
    generation: int  # moves on when the local file was replaced or quarantined (rows are rewritten)

    def hold(self, shard: tuple[int, int] = (0, 1), run_id: str = "") -> AbstractContextManager[None]:
        """Held by the manager while it runs: the one manager of `shard` (SignalgenError naming the
        holder otherwise)."""
    def ping(self) -> None:
        """A cheap write: StorageError when the store cannot be written (a health check)."""
    def leases(self) -> list[dict]:
        """The managers' leases (shard, host, pid, run_id, expires_at, live); [] for a file lock."""
    def close(self) -> None: ...
    def quarantine(self) -> Path: ...
    def upsert_instances(self, rows: list[dict]) -> None: ...
    def set_instance(self, worker_id: str, **fields: Any) -> None: ...
    def instances(self) -> list[dict]: ...
    def remove_instance(self, worker_id: str) -> None: ...
    def submit(self, command: str, strategy_id: str | None = None, parameters: dict | None = None) -> int: ...
    def pending(self) -> list[Command]: ...
    def complete(self, id: int, result: dict) -> bool: ...
    def fail(self, id: int, error: str) -> bool: ...
    def command(self, id: int) -> Command: ...
    def wait(self, id: int, timeout: float, poll_s: float = 0.05) -> Command: ...
    def heartbeat(self, worker_id: str, *, pid: int, state: str, last_bar_time: datetime | str | None,
                  checkpoint: datetime | str | None, signals: int, rejections: int, errors: int,
                  ready: bool, ts: str | None = None, paused_keys: int = 0) -> None: ...
    def relay_heartbeats(self, beats: dict[str, dict]) -> None: ...
    def heartbeats(self) -> dict[str, dict]: ...
    def save_worker_state(self, mode: str, worker_id: str, checkpoint: datetime,
                          warmup: list[bytes] | None = None) -> None: ...
    def worker_state(self, mode: str, worker_id: str) -> tuple[datetime, list[bytes]] | None: ...
    def record_resources(self, rows: list[tuple[str, float, float, float]]) -> None: ...
    def resources(self, latest_only: bool = True) -> dict[str, dict]: ...
    def event(self, worker_id: str | None, kind: str, detail: str | dict = "") -> None: ...
    def record(self, instances: list[dict], events: list[tuple[str, str | None, str, str]], *,
               manager: tuple[int, str] | None = None) -> None: ...
    def managers(self) -> list[dict]: ...
    def events(self, worker_id: str | None = None, limit: int = 100) -> list[dict]: ...
