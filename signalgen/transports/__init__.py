"""Messaging backends: one `Transport` per `messaging.type`, one file each, imported only when chosen.

A new backend plugs in here and touches nothing else: the worker process, the manager, `start` and
`deploy` ask `transport_for(environment)` (docs/architecture.md, "Transports").
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from signalgen.errors import ConfigError

if TYPE_CHECKING:
    from signalgen.config.models import EnvironmentConfig
    from signalgen.transports.base import Transport

TRANSPORTS: dict[str, str] = {
    "local": "signalgen.transports.local:LocalTransport",
    "redis": "signalgen.transports.redis:RedisTransport",
    "pubsub": "signalgen.transports.pubsub:PubSubTransport",
}


def transport_for(environment: EnvironmentConfig, file: str | None = None) -> Transport:
    """The transport of the environment's `messaging.type`; ConfigError (naming `file`) when this
    release has none."""
    kind = environment.messaging.type
    if kind not in TRANSPORTS:
        raise ConfigError(f"messaging type {kind!r} is not available in this release; use "
                          f"{', '.join(sorted(TRANSPORTS))}", file=file, field="messaging.type")
    module, name = TRANSPORTS[kind].split(":")
    return getattr(importlib.import_module(module), name)()
