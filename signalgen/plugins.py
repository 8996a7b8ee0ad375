"""Backends chosen by an environment's `type:` keys: a registry maps each type to "module:Class", and a
backend's module is imported only when its type is chosen (an optional package is needed only then)."""

from __future__ import annotations

import importlib

from signalgen.errors import ConfigError


def plugin(registry: dict[str, str], kind: str, *, field: str, file: str | None = None) -> type:
    """The class registered for `kind`; ConfigError naming `field` (and `file`) when this release has
    none: `<storage> type 'x' is not available in this release; use a, b`."""
    if kind not in registry:
        raise ConfigError(f"{field.split('.')[0]} type {kind!r} is not available in this release; use "
                          f"{', '.join(sorted(registry))}", file=file, field=field)
    module, name = registry[kind].split(":")
    return getattr(importlib.import_module(module), name)
