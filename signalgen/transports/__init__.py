"""Messaging backends: one `Transport` per `messaging.type`, one file each, imported only when chosen.

A new backend plugs in here and touches nothing else: the worker process, the manager, `start` and
`deploy` ask `transport_for(environment)` (docs/architecture.md, "Transports").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from signalgen.plugins import plugin

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
    return plugin(TRANSPORTS, environment.messaging.type, field="messaging.type", file=file)()
