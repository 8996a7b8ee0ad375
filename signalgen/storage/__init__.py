"""Signal stores: one protocol (`base.SignalStore`), one backend per file, chosen by the
environment's `storage.type` and imported only when chosen."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from signalgen.plugins import plugin

if TYPE_CHECKING:
    from signalgen.config.models import EnvironmentConfig, RunConfig
    from signalgen.storage.base import SignalStore

log = logging.getLogger(__name__)

STORES: dict[str, str] = {
    "duckdb": "signalgen.storage.duckdb:DuckDBStore",
    "bigquery": "signalgen.storage.bigquery:BigQueryStore",
}


def store_class(environment: EnvironmentConfig, file: str | None = None) -> type[SignalStore]:
    """The store class of the environment's `storage.type`; ConfigError (naming `file`) when this
    release has none."""
    return plugin(STORES, environment.storage.type, field="storage.type", file=file)


def store_for(environment: EnvironmentConfig, root: Path | str, file: str | None = None) -> SignalStore:
    """The environment's store, unopened: enough to `read()` without taking the writer's place
    (the `signals` and `runs` commands load only the environment)."""
    return store_class(environment, file).from_config(environment, Path(root))


def open_store(cfg: RunConfig) -> SignalStore:
    """The environment's store, opened for writing; runs whose writer is gone (`base.owner_gone`: a
    process of this host that died, or for a store with one holder a run without an owner) are
    marked 'abandoned'."""
    store = store_for(cfg.environment, cfg.root, cfg.files.get("environment"))
    store.open()
    try:
        for run_id in store.abandon_stale_runs(datetime.now(timezone.utc)):
            log.warning("run %s never finished; marked abandoned", run_id, extra={"run_id": run_id})
    except BaseException:
        store.close()
        raise
    return store
