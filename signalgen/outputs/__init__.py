"""Signal outputs: one protocol (`base.Output`), one backend per file, chosen by alias.

Backends are imported only when chosen, so an optional package (redis, google-cloud) is needed
only by the runs that use it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import polars as pl

from signalgen.config.models import Routing
from signalgen.errors import ConfigError
from signalgen.signals.types import SIGNAL_SCHEMA, STREAM_SCHEMA

if TYPE_CHECKING:
    from signalgen.config.models import RunConfig
    from signalgen.outputs.base import Output

OUTPUTS: dict[str, str] = {
    "quantconnect": "signalgen.outputs.quantconnect:QuantConnectCsvOutput",
    "local": "signalgen.outputs.local:LocalStreamOutput",
    "memory": "signalgen.outputs.memory:ListOutput",
    "redis": "signalgen.outputs.redis:RedisOutput",
    "pubsub": "signalgen.outputs.pubsub:PubSubOutput",
}


def output_class(alias: str) -> type:
    """The output class registered under `alias`, imported now. Unknown alias -> ConfigError."""
    try:
        module, name = OUTPUTS[alias].split(":")
    except KeyError:
        raise ConfigError(f"unknown output {alias!r}; known: {', '.join(sorted(OUTPUTS))}") from None
    return getattr(importlib.import_module(module), name)


# where a routing sends a strategy's signals: the research file (QuantConnect CSV) and/or the
# environment's internal stream (messaging.type picks the backend)
DESTINATIONS: dict[Routing, tuple[str, ...]] = {
    Routing.QUANTCONNECT: ("quantconnect",), Routing.INTERNAL: ("internal",),
    Routing.BOTH: ("quantconnect", "internal"),
}


def output_alias(cfg: RunConfig, destination: str) -> str:
    """The registered output serving `destination` ("quantconnect" or "internal") in this environment.

    ConfigError naming the environment file when this release has no backend for it."""
    alias = "quantconnect" if destination == "quantconnect" else cfg.environment.messaging.type
    if alias not in OUTPUTS:
        raise ConfigError(f"messaging type {alias!r} is not available in this release; use local",
                          file=cfg.files.get("environment"), field="messaging.type")
    return alias


def build_output(cfg: RunConfig, client_id: str, destination: str) -> Output:
    """`client_id`'s output for `destination` in the run's mode, built by its backend's
    `from_config` (not yet opened)."""
    return output_class(output_alias(cfg, destination)).from_config(cfg, client_id)


def _others(column: pl.Series, value: str) -> list:
    """The distinct values of a string column other than `value` (nulls included)."""
    unique = column.unique()
    return [v for v in unique.to_list() if v != value]


def client_batch(batch: pl.DataFrame, client_id: str, mode: str | None = None) -> pl.DataFrame:
    """Check a batch handed to an output: SIGNAL_SCHEMA columns (or STREAM_SCHEMA's: with each signal's
    revision and retractions, as the writer hands them), only `client_id`'s rows, and (if given) only
    rows of `mode`.

    Returns the batch with the schema's columns in order. Raises ValueError otherwise: a row of
    another client reaching this output is a routing bug, and delivering it would leak signals
    across tenants; a row of another mode would mix, say, mock signals into a live stream.
    """
    schema = batch.schema  # built on every access: read once
    want = STREAM_SCHEMA if "revision" in schema or "retracted" in schema else SIGNAL_SCHEMA
    missing = [c for c in want if c not in schema]
    wrong = [f"{c}: {schema[c]} (want {t})" for c, t in want.items() if c in schema and schema[c] != t]
    if missing or wrong:
        raise ValueError(f"not a signal batch: missing {missing}, wrong types {wrong}")
    others = _others(batch["client_id"], client_id)
    if others:
        raise ValueError(f"output of client {client_id!r} was given signals of {sorted(others, key=str)}")
    if mode is not None:
        modes = _others(batch["mode"], mode)
        if modes:
            raise ValueError(f"{mode} output of client {client_id!r} was given {sorted(modes, key=str)} signals")
    names = want.names()
    return batch if batch.columns == names else batch.select(names)
