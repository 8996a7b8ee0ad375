"""Logging: one `signalgen` logger tree, configured once by the CLI from the environment's `log_level`.

Modules log with the standard library: `log = logging.getLogger(__name__)` and structured fields in
`extra` (`run_id`, `client`, `strategy`, `symbol`, `worker`, `path`), e.g.
`log.warning("no bars in range", extra={"worker": spec.id, "run_id": run_id})`.
`configure()` decides how records are rendered; nothing else installs handlers. A line reads
`2025-03-01T12:00:00Z WARNING signalgen.modes: no bars in range run_id=... worker=...`.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import time
from pathlib import Path

FIELDS = ("run_id", "worker", "client", "strategy", "symbol", "path")
MAX_ECHO = 200  # characters of outside input that a log line, a result or an error may quote


def excerpt(value: object, limit: int = MAX_ECHO) -> str:
    """Outside input, quoted for a message: `repr` of at most `limit` characters (control characters
    escaped, so no input can forge a log line), with the full length when it was cut."""
    if not isinstance(value, (str, bytes)):
        value = repr(value)
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value):,} {'characters' if isinstance(value, str) else 'bytes'})"

# attributes every LogRecord has; anything else on a record came in through `extra`
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def field_value(v: object) -> str:
    """One `key=value` field's value: clipped to MAX_VALUE, quoted when it holds a space, a quote or `=`."""
    text = str(v)
    if len(text) > MAX_ECHO:
        text = text[:MAX_ECHO] + "..."
    # quoted only when needed, so `grep run_id=abc` works on the common case
    return json.dumps(text) if not text or any(c.isspace() or c in '"=' for c in text) else text


class KeyValueFormatter(logging.Formatter):
    """`<UTC time> <LEVEL> <logger>: <message> key=value ...`: the known fields first, then other extras."""

    converter = time.gmtime

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%Y-%m-%dT%H:%M:%SZ")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [k for k in vars(record) if k not in _STANDARD and not k.startswith("_")]
        keys = [k for k in FIELDS if k in extras] + sorted(k for k in extras if k not in FIELDS)
        fields = " ".join(f"{k}={field_value(getattr(record, k))}" for k in keys if getattr(record, k) is not None)
        if not fields:
            return line
        head, nl, rest = line.partition("\n")  # keep fields on the message line, before a traceback
        return f"{head} {fields}{nl}{rest}"


class Outage:
    """One log line when something starts failing and one when it works again, however many times it
    fails in between (a full disk must not fill the log with the same line twice a second)."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self.logger, self.what = logger, what
        self.since: float | None = None
        self.reason = ""

    def failed(self, exc: object) -> bool:
        """Note a failure; True when it is the first of an outage (it was logged)."""
        self.reason = " ".join(str(exc).split())[:MAX_ECHO]
        if self.since is not None:
            return False
        self.since = time.monotonic()
        self.logger.warning("%s failed: %s (logged once until it works again)", self.what, self.reason)
        return True

    def ok(self) -> bool:
        """Note a success; True when it ends an outage (it was logged)."""
        if self.since is None:
            return False
        self.logger.warning("%s works again after %.1f s (it failed: %s)", self.what,
                            time.monotonic() - self.since, self.reason)
        self.since = None
        return True


def configure(level: str = "INFO") -> None:
    """Send `signalgen.*` records at `level` and above to stderr as key=value lines.

    Safe to call again (e.g. once per loaded config): the level changes, the handler stays one.
    """
    logger = logging.getLogger("signalgen")
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(KeyValueFormatter())
        logger.addHandler(handler)
    logger.propagate = False


def log_to_file(path: Path | str, *, max_mb: float, backups: int, level: str | None = None,
                only: bool = False) -> None:
    """Send `signalgen.*` records to `path`, rotated at `max_mb` MB with `backups` old files kept
    (`path.1` ... `path.<backups>`); `only`: instead of every other handler (a worker's own log).

    A record that cannot be written (a full disk) is dropped without a traceback on stderr: the
    outage is reported once where it can be (`Outage`), not once per line.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=int(max_mb * 2**20), backupCount=backups)
    handler.setFormatter(KeyValueFormatter())
    logger = logging.getLogger("signalgen")
    if only:
        for old in list(logger.handlers):
            logger.removeHandler(old)
            old.close()
    logger.addHandler(handler)
    if level is not None:
        logger.setLevel(level)
    logger.propagate = False
    logging.raiseExceptions = False
