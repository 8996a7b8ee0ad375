"""Control stores: one protocol (`base.ControlStoreProtocol`), one backend per file, chosen by the
environment's `control.type` (sqlite.py, the default; postgres.py, shared by several managers) and
imported only when chosen. What callers imported from the single module before is re-exported here."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from signalgen.plugins import plugin
from signalgen.storage.control.base import (COMMAND_STATUSES, HEARTBEAT_COLUMNS, INSTANCE_COLUMNS, MAX_FIELD_CHARS,
                                            MAX_PARAMETERS_BYTES, MAX_PARAMETERS_DEPTH, Command,
                                            ControlStoreCorrupt, ControlStoreProtocol, LeaseLost, control_path_of,
                                            epoch, iso, json_depth, now_iso, parse_parameters, shard_name)
from signalgen.storage.control.sqlite import ControlStore

if TYPE_CHECKING:
    from signalgen.config.models import EnvironmentConfig, RunConfig

__all__ = ["COMMAND_STATUSES", "CONTROL_STORES", "HEARTBEAT_COLUMNS", "INSTANCE_COLUMNS", "MAX_FIELD_CHARS",
           "MAX_PARAMETERS_BYTES", "MAX_PARAMETERS_DEPTH", "Command", "ControlStore", "ControlStoreCorrupt",
           "ControlStoreProtocol", "LeaseLost", "control_for", "control_path_of", "epoch", "iso", "json_depth",
           "now_iso", "open_control", "parse_parameters", "shard_name", "spool_path"]

CONTROL_STORES: dict[str, str] = {
    "sqlite": "signalgen.storage.control.sqlite:ControlStore",
    "postgres": "signalgen.storage.control.postgres:PostgresControlStore",
}


def spool_path(path: Path, shard: tuple[int, int] | None) -> Path:
    """The local SQLite file of one shard's manager: `path` itself unsharded, else
    `<stem>.shard-<i>-of-<N><suffix>` beside it, so several managers on one host never share one."""
    if shard is None or shard[1] == 1:
        return path
    return path.with_name(f"{path.stem}.shard-{shard[0]}-of-{shard[1]}{path.suffix}")


def control_for(environment: EnvironmentConfig, root: Path | str, *, shard: tuple[int, int] | None = None,
                file: str | None = None) -> ControlStoreProtocol:
    """The environment's control store: the SQLite file at `control.path`, or the PostgreSQL database
    named by `control.dsn_env`. `shard` (a manager's): the PostgreSQL store's spool for that shard;
    without it (the CLI) the store reads every shard's rows. ConfigError (exit 2) naming the field
    when the type is unknown or the DSN variable is unset."""
    cls = plugin(CONTROL_STORES, environment.control.type, field="control.type", file=file)
    return cls.for_environment(environment, Path(root), shard=shard)


def open_control(cfg: RunConfig, shard: tuple[int, int] | None = None) -> ControlStoreProtocol:
    """The run's control store (see `control_for`)."""
    return control_for(cfg.environment, cfg.root, shard=shard, file=cfg.files.get("environment"))
