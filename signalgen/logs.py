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
import time

FIELDS = ("run_id", "worker", "client", "strategy", "symbol", "path")
MAX_VALUE = 200  # characters of one field value; longer values are cut, never echoed in full

# attributes every LogRecord has; anything else on a record came in through `extra`
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def field_value(v: object) -> str:
    """One `key=value` field's value: clipped to MAX_VALUE, quoted when it holds a space, a quote or `=`."""
    text = str(v)
    if len(text) > MAX_VALUE:
        text = text[:MAX_VALUE] + "..."
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
