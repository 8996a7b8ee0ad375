"""Logging: one `signalgen` logger tree, configured once by the CLI from the environment's `log_level`.

Modules log with the standard library: `log = logging.getLogger(__name__)` and structured fields in
`extra` (`run_id`, `client`, `strategy`, `symbol`, `worker`, `path`), e.g.
`log.warning("no bars in range", extra={"worker": spec.id, "run_id": run_id})`.
`configure()` decides how records are rendered; nothing else installs handlers.
"""

from __future__ import annotations

import logging

FIELDS = ("run_id", "worker", "client", "strategy", "symbol", "path")


def configure(level: str = "INFO") -> None:
    """Send `signalgen.*` records at `level` and above to stderr."""
    logger = logging.getLogger("signalgen")
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.propagate = False
