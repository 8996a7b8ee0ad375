"""Imported once by the fork server (`set_forkserver_preload(["signalgen.process.preload"])`), so
every worker forked from it shares these modules' pages instead of importing them again.

Issue 8 measured 50 workers: 79 s and 170 MB private memory each with `spawn`, 3.8 s and 27 MB each
forked from a parent that had imported the heavy libraries and called `gc.freeze()`. The freeze
moves every object imported here into a permanent generation the collector never scans, so a
collection in a worker does not write to (and thereby copy) the shared pages.

Nothing here may start a thread or a connection (neither survives a fork): imports only. Optional
backends (redis, google-cloud-pubsub) are imported when installed.
"""

from __future__ import annotations

import gc
import importlib

HEAVY = ("numpy", "polars", "pyarrow", "scipy.signal", "onnxruntime", "lightgbm", "duckdb", "sqlite3", "pydantic",
         "yaml")
SIGNALGEN = ("signalgen.config.loader", "signalgen.config.workers", "signalgen.data.synthetic",
             "signalgen.data.files", "signalgen.data.validation", "signalgen.features.batch",
             "signalgen.features.incremental", "signalgen.models.backends", "signalgen.models.registry",
             "signalgen.signals.pipeline", "signalgen.modes.engine", "signalgen.modes.sources",
             "signalgen.modes.worker", "signalgen.storage.control", "signalgen.transports", "signalgen.transports.local",
             "signalgen.transports.redis", "signalgen.brokers.pubsub", "signalgen.transports.pubsub",
             "signalgen.process.worker", "signalgen.logs",
             # live workers' sink and feed (redis itself is imported lazily, under OPTIONAL); a mock or
             # simulation worker touches the sink module when it closes
             "signalgen.outputs.redis", "signalgen.data.redis_bars")
OPTIONAL = ("redis", "google.cloud.pubsub_v1")


def preload() -> list[str]:
    """Import the modules a worker needs; the optional ones that are missing are skipped. Returns
    the names imported."""
    done = []
    for name in HEAVY + SIGNALGEN:
        importlib.import_module(name)
        done.append(name)
    for name in OPTIONAL:
        try:
            importlib.import_module(name)
            done.append(name)
        except ImportError:
            pass
    return done


LOADED = preload()
gc.freeze()
