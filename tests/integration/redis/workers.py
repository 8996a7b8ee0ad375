"""A live worker process for the fault tests: run_worker(live_feed + RedisSink), resuming from the
checkpoint Redis holds. Run as `python -m tests.integration.redis.workers <json args>`.

Args: root, worker (id), end (ISO: stop after the bar ending then), speed (ReplayClock pacing, bar time
per real time: deterministic `generated_at` and a worker that stays behind the stream), max_buffered,
result (a JSON file written at the end: outcome and sink stats).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from signalgen.config.loader import LIVE_START, load_config
from signalgen.config.workers import worker_specs
from signalgen.data.redis_bars import live_feed
from signalgen.modes.worker import ReplayClock, WorkerContext, run_worker
from signalgen.outputs.redis import RedisSink

STARTED = datetime.now(timezone.utc) + timedelta(days=1)  # after the session's models were trained


def until(feed, end: datetime):
    """The feed up to and including the bar ending at `end`."""
    for bar in feed:
        yield bar
        if bar["bar_time"] >= end:
            return


def main(args: dict) -> int:
    logging.basicConfig(level=logging.INFO, format="%(created).3f %(levelname)s %(name)s: %(message)s")
    cfg = load_config("local-integration", "live", root=Path(args["root"]), clients=args.get("clients"))
    spec = next(s for s in worker_specs(cfg) if s.id == args["worker"])
    sink = RedisSink.from_config(cfg, max_buffered=args.get("max_buffered", 10_000))
    after = sink.resume_point(spec.id)
    logging.info("resume point %s", after)
    ctx = WorkerContext(str(Path(cfg.root) / cfg.environment.paths.registry_dir), "mock", STARTED, "live",
                        "run-live", after or LIVE_START, seed=cfg.seed)
    feed = live_feed(cfg, spec, after=after, count=args.get("count", 256))
    outcome = run_worker(spec, until(feed, datetime.fromisoformat(args["end"])), sink,
                         ReplayClock(args.get("speed", 0.0)), ctx)
    sink.close()
    s = sink.stats
    Path(args["result"]).write_text(json.dumps({
        "bars": outcome.bars, "signals": outcome.signals, "checkpoint": str(outcome.checkpoint),
        "resumed_from": str(after), "outages": s.outages, "backpressure_events": s.backpressure_events,
        "max_buffered": s.max_buffered, "last_outage_s": s.last_outage_s, "recovered_at": s.recovered_at,
        "exec_us": list(s.exec_us)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
