"""Benchmark (issue 9 §4): live latency, from a bar's publish to its decision's arrival at a consumer.

On a private redis-server (own port, no persistence), `python strategy_runner.py start --env
local-integration --mode live` supervises N live workers (clients of 10 symbols each, one strategy of
two models, 5m bars); the manager hosts the recorder, which writes each decision on from the workers'
internal streams to its client's streams (the path the consumer measures). This process then:

1. publishes ~130 history bars per series (warm-up; old, so decided `stale_data`) and waits until
   every worker's checkpoint holds the last one;
2. measures the floor in the same run: one Redis round trip (PING) + one single-row inference of
   both models (ONNX, one thread), medians, back to back and after 10 ms of idle (the wake-up of a
   halted virtual core and a cold cache, which every hop of a bar at a low rate pays); and the path
   with no work in it — publisher -> Redis -> a relay process -> Redis -> a consumer process — at
   each step's fleet rate, through one relay process and through as many as there are workers
   (each woken as rarely as a worker: the fleet's own floor);
3. steps the rate: for each per-worker rate r (bars per second per series), publishes r bars per
   second to every series for `--seconds` (spread evenly across each period; the bars due at the
   same moment go in one pipeline, stamped with its wall time just before it is sent), while a consumer *process* XREADs every client's signal
   and rejection streams and stamps each entry's arrival; latency = arrival - publish, per decision
   (signals and rejections alike: every bar yields one); p50 / p99 / p99.9 per step. The highest
   total rate whose p99 stays <= 5 ms is the sustained throughput;
4. then the `--together` steps: every series' bar of a tick published at once in one pipeline, as
   `feed` publishes the bars of one bar time (many symbols' bars closing at the same moment).

Where the time goes, per decision: publish -> `generated_at` (the worker's wall clock when it began
deciding: XREAD wake-up, decode, validation, features) and `generated_at` -> arrival (inference,
rules, record building, the send (one script call), the consumer's wake-up); `latency_us` is the worker's own
compute. Every stamp is the same host's wall clock.

Prints the figures; `--write` also puts them and the command into docs/benchmarks.md (between markers).

    python bench/live_latency.py --write                 # 100 workers, rates 1,2,5,10 per worker + 1 together
    python bench/live_latency.py --workers 20 --rates 1,5 --seconds 5
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from historical import machine, write_section  # noqa: E402

MARK_BEGIN, MARK_END = "<!-- bench/live_latency.py:begin -->", "<!-- bench/live_latency.py:end -->"
SYMBOLS_PER_CLIENT = 10
MODELS = ("swing_high", "swing_low")
HISTORY = 130  # bars per series before the measurement (history_bars = 121 for these models)
STEP = timedelta(minutes=5)
TARGET_P99_MS = 5.0


def setup(root: Path, workers: int, url: str, nice: int | None = None) -> tuple[list[str], list[str]]:
    """A root with `workers` live workers (clients c000, c001, ... of up to 10 symbols); local-integration
    at `url`, its workers at CPU niceness `nice` (None: the shipped file's). Returns (worker ids, client ids)."""
    root.mkdir(parents=True, exist_ok=True)
    for layer in ("environments", "modes"):
        subprocess.run(["cp", "-r", str(ROOT / layer), str(root / layer)], check=True)
    (root / "registry").symlink_to(ROOT / "registry")
    (root / "clients").mkdir()
    env_file = root / "environments" / "local-integration.yaml"
    env = yaml.safe_load(env_file.read_text())
    env["messaging"]["url"] = url
    env["messaging"]["max_ahead_s"] = 30 * 86_400.0  # the measured bars run ahead of the wall clock
    env["process"] = {**env["process"], "heartbeat_threshold_s": 120.0,
                      "resource_sample_s": 10.0, **({} if nice is None else {"nice": nice})}
    env["log_level"] = "WARNING"
    env_file.write_text(yaml.safe_dump(env, sort_keys=False))
    ids, clients = [], []
    for c in range((workers + SYMBOLS_PER_CLIENT - 1) // SYMBOLS_PER_CLIENT):
        n = min(SYMBOLS_PER_CLIENT, workers - c * SYMBOLS_PER_CLIENT)
        symbols = [f"S{c:03d}X{i}" for i in range(n)]
        client = {"id": f"c{c:03d}", "routing": "internal",
                  "strategies": [{"id": "live_v1", "symbols": symbols, "timeframes": ["5m"],
                                  "models": [{"model_id": m, "confidence_threshold": 0.55} for m in MODELS]}]}
        (root / "clients" / f"c{c:03d}.yaml").write_text(yaml.safe_dump(client, sort_keys=False))
        ids += [f"c{c:03d}.live_v1.{s}.5m" for s in symbols]
        clients.append(f"c{c:03d}")
    return ids, clients


def states(control: Path) -> dict[str, str]:
    if not control.exists():
        return {}
    try:
        with sqlite3.connect(control, timeout=5) as con:
            return dict(con.execute("SELECT id, state FROM strategy_instances").fetchall())
    except sqlite3.Error:
        return {}


def bars_of(symbol: str, first_end: datetime, n: int, seed: int) -> list[dict]:
    """`n` synthetic 5m bars of `symbol` ending at first_end, first_end + 5m, ... (BAR_SCHEMA dicts)."""
    from signalgen.data.synthetic import iter_synthetic_chunks

    start = first_end - STEP
    rows = []
    for frame in iter_synthetic_chunks(symbol, "5m", start, start + n * STEP, seed, 10_000):
        rows += frame.to_dicts()
    return rows[:n]


IDLE_S = 0.01  # the gap between a fleet's bars at 100 bars/s: how long the cores sit idle before each hop


def floor(url: str) -> dict:
    """Medians: one PING round trip to this Redis, and one single-row inference of both models, each
    back to back (warm) and after IDLE_S of idle (as a bar finds the machine at 100 bars/s: a virtual
    machine wakes a halted core and a cold cache)."""
    import redis

    from signalgen.features.spec import FEATURE_NAMES
    from signalgen.models.backends import load_predictor
    from signalgen.models.registry import ModelRegistry

    r = redis.Redis.from_url(url)
    r.ping()
    rtt = []
    for _ in range(2000):
        t0 = time.perf_counter_ns()
        r.ping()
        rtt.append(time.perf_counter_ns() - t0)
    rtt_idle = []
    for _ in range(300):
        time.sleep(IDLE_S)
        t0 = time.perf_counter_ns()
        r.ping()
        rtt_idle.append(time.perf_counter_ns() - t0)
    reg = ModelRegistry(ROOT / "registry")
    predictors = [load_predictor(reg, m, "onnx", threads=1) for m in MODELS]
    rows = np.random.default_rng(7).normal(0, 0.01, (2000, len(FEATURE_NAMES))).astype(np.float32)
    for p in predictors:
        p.predict(rows[:1])
    inf = []
    for i in range(len(rows)):
        t0 = time.perf_counter_ns()
        for p in predictors:
            p.predict(rows[i:i + 1])
        inf.append(time.perf_counter_ns() - t0)
    inf_idle = []
    for i in range(300):
        time.sleep(IDLE_S)
        t0 = time.perf_counter_ns()
        for p in predictors:
            p.predict(rows[i:i + 1])
        inf_idle.append(time.perf_counter_ns() - t0)
    return {"rtt_us": float(np.median(rtt)) / 1e3, "inference_us": float(np.median(inf)) / 1e3,
            "rtt_idle_us": float(np.median(rtt_idle)) / 1e3, "inference_idle_us": float(np.median(inf_idle)) / 1e3}


def relay(url: str, key: str, ready, stop) -> None:
    """Relay process of `relay_floor`: XREAD each entry of `key`, XADD it to `floor:out` at once."""
    import redis

    r = redis.Redis.from_url(url)
    last = "$"
    ready.release()
    while not stop.is_set():
        for _, entries in r.xread({key: last}, count=100, block=200) or ():
            for eid, fields in entries:
                r.xadd("floor:out", fields)
            last = entries[-1][0]


def relay_arrivals(url: str, out_path: str, ready, stop) -> None:
    """Consumer process of `relay_floor`: (publish stamp, arrival) of each `floor:out` entry."""
    import redis

    r = redis.Redis.from_url(url)
    last, got = "$", []
    ready.release()
    while not stop.is_set():
        for _, entries in r.xread({"floor:out": last}, count=1000, block=200) or ():
            now = time.time()
            got += [(float(fields[b"t"]), now) for _, fields in entries]
            last = entries[-1][0]
    Path(out_path).write_text(json.dumps(got))


def relay_floor(url: str, rate: float, seconds: float, tmp: Path, relays: int = 1, together: bool = False) -> dict:
    """The path's floor with no work in it: publisher -> Redis -> a relay process that XADDs each entry
    on as it arrives -> Redis -> a consumer process, at `rate` entries per second. It pays the same
    three wake-ups and three round trips as a bar and its signal, and nothing else. With `relays`
    processes, entry i goes to relay i mod `relays` (each on its own stream), as bars go to the fleet's
    workers: each relay then wakes `rate / relays` times a second, as each worker does. `together`: the
    entries of each round (one per relay) go out at once in one pipeline, as the bars of one bar time."""
    ctx = mp.get_context("fork")  # the relays run only redis-py: no need to import this module again
    stop, ready = ctx.Event(), ctx.Semaphore(0)
    out_path = str(tmp / "relay.json")
    procs = [ctx.Process(target=relay, args=(url, f"floor:in:{i}", ready, stop)) for i in range(relays)]
    procs.append(ctx.Process(target=relay_arrivals, args=(url, out_path, ready, stop)))
    for p in procs:
        p.start()
    for _ in procs:
        if not ready.acquire(timeout=60):
            raise RuntimeError("relay processes did not start within 60 s")
    time.sleep(0.5)
    import redis

    r = redis.Redis.from_url(url)
    t0 = time.monotonic()
    group = relays if together else 1
    for i in range(0, int(rate * seconds), group):
        wait = t0 + i / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        pipe = r.pipeline(transaction=False)
        for j in range(i, i + group):
            pipe.xadd(f"floor:in:{j % relays}", {"t": repr(time.time())})
        pipe.execute()
    time.sleep(0.5)
    stop.set()
    for p in procs:
        p.join(30)
    lat = [(arrived - sent) * 1e3 for sent, arrived in json.loads(Path(out_path).read_text())]
    return {"rate": rate, "relays": relays, "together": together, "n": len(lat), "p50": pct(lat, 50),
            "p99": pct(lat, 99)}


def consume(url: str, keys: list[str], out_path: str, ready, stop) -> None:
    """Consumer process: XREAD every key from its end, stamping each entry's arrival (wall clock)."""
    import redis

    r = redis.Redis.from_url(url)
    # each key's last entry now, resolved once: "$" means "after the newest entry" anew at every call,
    # so entries added to a key while this process handles another key's would be skipped
    last = {}
    for k in keys:
        top = r.xrevrange(k, count=1)
        last[k] = top[0][0] if top else "0-0"
    got = []
    ready.set()
    while not stop.is_set():
        reply = r.xread(last, count=1000, block=200)
        now = time.time()
        for key, entries in reply or ():
            key = key.decode()
            for eid, fields in entries:
                d = json.loads(fields[b"data"])
                got.append((d["symbol"], d["bar_time"], now, d["generated_at"], d.get("latency_us"),
                            ":signals:" in key))
            last[key] = entries[-1][0]
    Path(out_path).write_text(json.dumps(got))


def iso_to_epoch(s: str) -> float:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def wait_checkpoints(r, key: str, ids: list[str], at: datetime, timeout: float) -> float:
    """Seconds until every worker's checkpoint (Redis hash) is >= `at`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        held = r.hmget(key, ids)
        if all(v is not None and datetime.fromisoformat(v.decode()) >= at for v in held):
            return time.monotonic() - t0
        time.sleep(0.2)
    behind = sum(1 for v in r.hmget(key, ids) if v is None or datetime.fromisoformat(v.decode()) < at)
    raise RuntimeError(f"{behind} workers did not reach {at} within {timeout} s")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run(args) -> dict:
    import redis

    from signalgen.brokers.codec import encode_bar
    from signalgen.data.redis_bars import entry_id
    from signalgen.brokers.redis import StreamKeys
    from tests.integration.redis.servers import RedisServer

    keys = StreamKeys("signalgen")
    with tempfile.TemporaryDirectory(prefix="signalgen-live-") as tmp:
        tmp = Path(tmp)
        server = RedisServer(tmp / "redis").start()
        manager = None
        try:
            root = tmp / "root"
            ids, clients = setup(root, args.workers, server.url, args.nice)
            symbols = [i.split(".")[2] for i in ids]
            control = root / "var/local-integration/control.sqlite"
            cmd = [sys.executable, str(ROOT / "strategy_runner.py"), "start", "--env", "local-integration",
                   "--mode", "live", "--root", str(root)] + (["--inference", "mock"] if args.inference == "mock" else [])
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            log = open(tmp / "manager.log", "wb")
            t_start = time.monotonic()
            manager = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
            while True:
                s = states(control)
                if len(s) == len(ids) and all(v == "RUNNING" for v in s.values()):
                    break
                if manager.poll() is not None:
                    raise RuntimeError(f"manager exited: {(tmp / 'manager.log').read_text()[-2000:]}")
                if time.monotonic() - t_start > args.start_timeout:
                    raise RuntimeError(f"not all RUNNING after {args.start_timeout} s: "
                                       f"{sum(v == 'RUNNING' for v in s.values())}/{len(ids)}")
                time.sleep(0.5)
            started_s = time.monotonic() - t_start
            print(f"{len(ids)} workers RUNNING after {started_s:.1f} s", flush=True)

            r = redis.Redis.from_url(server.url)
            now = datetime.now(timezone.utc)
            epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
            t_hist = epoch + ((now - epoch) // STEP) * STEP - HISTORY * STEP
            plan = [(rate, False) for rate in args.rates] + [(rate, True) for rate in args.together]
            measured = sum(int(rate * args.seconds) for rate, _ in plan)
            series = {s: bars_of(s, t_hist + STEP, HISTORY + measured + 1, 7 + i) for i, s in enumerate(symbols)}
            pipe = r.pipeline(transaction=False)
            for s in symbols:
                for bar in series[s][:HISTORY]:
                    pipe.xadd(keys.bars(s, "5m"), encode_bar(bar), id=entry_id(bar["bar_time"]))
            pipe.execute()
            warm_s = wait_checkpoints(r, keys.checkpoints("live"), ids, series[symbols[0]][HISTORY - 1]["bar_time"],
                                      args.start_timeout)
            print(f"warm-up decided in {warm_s:.1f} s", flush=True)
            fl = floor(server.url)
            fl["relay"] = [relay_floor(server.url, rate * len(ids), 5.0, tmp) for rate in args.rates]
            fl["relay_fleet"] = [relay_floor(server.url, rate * len(ids), 5.0, tmp, relays=len(ids))
                                 for rate in args.rates]
            fl["relay_together"] = [relay_floor(server.url, rate * len(ids), 5.0, tmp, relays=len(ids), together=True)
                                    for rate in args.together]
            print("floor relay:", fl["relay"], fl["relay_fleet"], fl["relay_together"], flush=True)
            print(f"floor: PING {fl['rtt_us']:.0f} us + inference {fl['inference_us']:.0f} us; after "
                  f"{IDLE_S * 1e3:g} ms idle: {fl['rtt_idle_us']:.0f} + {fl['inference_idle_us']:.0f} us", flush=True)

            ctx = mp.get_context("spawn")
            stream_keys = [k for c in clients for k in (keys.signals("live", c), keys.rejections("live", c))]
            out_path = str(tmp / "arrivals.json")
            ready, stop = ctx.Event(), ctx.Event()
            consumer = ctx.Process(target=consume, args=(server.url, stream_keys, out_path, ready, stop))
            consumer.start()
            ready.wait(60)
            time.sleep(0.5)

            published: dict[tuple[str, str], tuple[float, int]] = {}  # (symbol, bar_time iso) -> (t, step)
            steps = []
            index = HISTORY
            for k, (rate, together) in enumerate(plan):
                ticks = int(rate * args.seconds)
                period = 1.0 / rate
                n = len(symbols)
                t0 = time.monotonic() + 0.2
                late = 0
                # (due time, series) in order; every bar already due goes out in one pipeline, each
                # stamped with the pipeline's send time (the publisher never becomes the bottleneck).
                # Spread: series j's bars are due j/n of a period later. Together: every series' bar of
                # a tick is due at once, so they go in one pipeline — as `feed` sends the bars of one
                # bar time, i.e. as bars of many symbols that close at the same moment arrive
                spread = 0.0 if together else period / n
                schedule = [(t0 + tick * period + j * spread, j, tick) for tick in range(ticks) for j in range(n)]
                i = 0
                while i < len(schedule):
                    wait = schedule[i][0] - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    now_m = time.monotonic()
                    batch = []
                    while i < len(schedule) and schedule[i][0] <= now_m:
                        batch.append(schedule[i])
                        i += 1
                    late += sum(1 for due, _, _ in batch if now_m - due > 0.005)
                    pipe = r.pipeline(transaction=False)
                    names = []
                    for _, j, tick in batch:
                        s, bar = symbols[j], series[symbols[j]][index + tick]
                        pipe.xadd(keys.bars(s, "5m"), encode_bar(bar), id=entry_id(bar["bar_time"]))
                        names.append((s, bar["bar_time"].strftime("%Y-%m-%dT%H:%M:%S.%fZ")))
                    stamp = time.time()
                    pipe.execute()
                    for name in names:
                        published[name] = (stamp, k)
                index += ticks
                end = t0 + ticks * period  # the step lasts its whole last period, bars spread or not
                if end > time.monotonic():
                    time.sleep(end - time.monotonic())
                wall = time.monotonic() - t0
                steps.append({"rate_per_worker": rate, "together": together, "bars": ticks * n, "offered_bars_s": rate * n,
                              "achieved_bars_s": ticks * n / wall, "late_publishes": late})
                print(f"step {k}: {rate} bar/s per worker{' (together)' if together else ''}, {ticks * n} bars in "
                      f"{wall:.1f} s", flush=True)
                try:
                    wait_checkpoints(r, keys.checkpoints("live"), ids, series[symbols[0]][index - 1]["bar_time"], 120)
                except RuntimeError as exc:
                    steps[-1]["error"] = str(exc)
                    print(exc, flush=True)
                    break
                time.sleep(1.0)  # let the decisions reach the consumer
            time.sleep(1.0)
            stop.set()
            consumer.join(60)
            arrivals = json.loads(Path(out_path).read_text())

            per_step: dict[int, dict[str, list[float]]] = {}
            for symbol, bar_time, arrived, generated, latency_us, is_signal in arrivals:
                hit = published.get((symbol, bar_time))
                if hit is None:
                    continue
                t_pub, k = hit
                d = per_step.setdefault(k, {"all": [], "signals": [], "to_decide": [], "decide_to_arrival": [],
                                            "compute": []})
                d["all"].append((arrived - t_pub) * 1e3)
                if is_signal:
                    d["signals"].append((arrived - t_pub) * 1e3)
                g = iso_to_epoch(generated)
                d["to_decide"].append((g - t_pub) * 1e3)
                d["decide_to_arrival"].append((arrived - g) * 1e3)
                if latency_us is not None:
                    d["compute"].append(latency_us / 1e3)
            for k, step in enumerate(steps):
                d = per_step.get(k, {})
                lat = d.get("all", [])
                step.update(decisions=len(lat), signals=len(d.get("signals", [])),
                            p50=pct(lat, 50), p99=pct(lat, 99), p999=pct(lat, 99.9), max=max(lat, default=float("nan")),
                            signal_p50=pct(d.get("signals", []), 50), signal_p99=pct(d.get("signals", []), 99),
                            to_decide_p50=pct(d.get("to_decide", []), 50),
                            decide_to_arrival_p50=pct(d.get("decide_to_arrival", []), 50),
                            compute_p50=pct(d.get("compute", []), 50))
                print(json.dumps(step), flush=True)
            rss = []
            import psutil

            for pid in [p.pid for p in psutil.Process(manager.pid).children(recursive=True)]:
                try:
                    rss.append(psutil.Process(pid).memory_full_info().uss / 2**20)
                except psutil.Error:
                    pass
            nice = yaml.safe_load((root / "environments/local-integration.yaml").read_text())["process"]["nice"]
            return {"workers": len(ids), "clients": len(clients), "nice": nice, "started_s": started_s, "warm_s": warm_s,
                    "floor": fl, "steps": steps, "uss_mb_median": float(np.median(rss)) if rss else None,
                    "inference": args.inference, "load": os.getloadavg()}
        finally:
            if manager is not None and manager.poll() is None:
                manager.send_signal(signal.SIGTERM)
                try:
                    manager.wait(120)
                except subprocess.TimeoutExpired:
                    manager.kill()
            server.stop()


def report(res: dict, command: str) -> str:
    fl = res["floor"]
    floor_ms = (fl["rtt_us"] + fl["inference_us"]) / 1e3
    idle_ms = (fl["rtt_idle_us"] + fl["inference_idle_us"]) / 1e3
    ok = [s for s in res["steps"]
          if not s["together"] and s.get("p99", float("inf")) <= TARGET_P99_MS and "error" not in s]
    best = max((s["achieved_bars_s"] for s in ok), default=None)
    lines = [MARK_BEGIN, "## Live latency", "",
             f"Command: `{command}` — run on {datetime.now(timezone.utc):%Y-%m-%d}, {machine()}; load average "
             f"during the run {res['load'][0]:.0f} (other jobs share the 2 cores).", "",
             f"{res['workers']} live workers ({res['clients']} clients x 10 symbols, one strategy of two models, "
             f"{res['inference']} inference, CPU niceness {res['nice']}) under one manager (`start --env local-integration --mode live`, "
             f"its recorder writing each decision on to its client's streams), a private redis-server without "
             f"persistence. All RUNNING after "
             f"{res['started_s']:.0f} s; warm-up ({HISTORY} bars per series) decided in {res['warm_s']:.0f} s; "
             f"median private memory (USS) per process {res['uss_mb_median'] or 0:.0f} MB.", "",
             f"Floor (same run): one Redis round trip {fl['rtt_us']:.0f} µs + one single-row inference of both "
             f"models {fl['inference_us']:.0f} µs = **{floor_ms:.2f} ms**, back to back. The same after "
             f"{IDLE_S * 1e3:g} ms of idle (the gap between bars at 100 bars/s): {fl['rtt_idle_us']:.0f} µs + "
             f"{fl['inference_idle_us']:.0f} µs = **{idle_ms:.2f} ms**. A bar's path wakes three idle "
             "processes in turn (Redis and the worker on the publish, Redis and the consumer on the signal).", "",
             "The path with no work in it (same run): the publisher -> Redis -> one relay process that XADDs "
             "each entry on as it arrives -> Redis -> a consumer process, at the fleet rate of each step: "
             + "; ".join(f"{x['rate']:,.0f}/s: p50 {x['p50']:.2f} ms, p99 {x['p99']:.2f} ms" for x in fl["relay"])
             + f". The same with {res['workers']} relay processes, entry i to relay i mod {res['workers']} (each "
             "wakes as rarely as a worker, and finds its memory as cold): "
             + "; ".join(f"{x['rate']:,.0f}/s: p50 **{x['p50']:.2f} ms**, p99 {x['p99']:.2f} ms"
                         for x in fl["relay_fleet"]) + "."
             + "".join(f" With each round's {res['workers']} entries published at once in one pipeline (as in the "
                       f"\"together\" steps), {x['rate']:,.0f}/s: p50 **{x['p50']:.2f} ms**, p99 {x['p99']:.2f} ms."
                       for x in fl["relay_together"]), "",
             "| bars/s per worker | fleet bars/s offered (achieved) | decisions | p50 | p99 | p99.9 | max "
             "| signals p50 / p99 | publish -> decide p50 | decide -> consumer p50 | worker compute p50 "
             "| publishes > 5 ms late |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in res["steps"]:
        lines.append(f"| {s['rate_per_worker']:g}{', together' if s['together'] else ''} | {s['offered_bars_s']:,.0f} ({s['achieved_bars_s']:,.0f}) | "
                     f"{s.get('decisions', 0):,} | {s.get('p50', float('nan')):.2f} ms | "
                     f"{s.get('p99', float('nan')):.2f} ms | {s.get('p999', float('nan')):.2f} ms | "
                     f"{s.get('max', float('nan')):.1f} ms | {s.get('signal_p50', float('nan')):.2f} / "
                     f"{s.get('signal_p99', float('nan')):.2f} ms | {s.get('to_decide_p50', float('nan')):.2f} ms | "
                     f"{s.get('decide_to_arrival_p50', float('nan')):.2f} ms | {s.get('compute_p50', float('nan')):.2f} ms | "
                     f"{s['late_publishes']:,} |")
    lines += ["", "\"Together\": every series' bar of a tick published at once, in one pipeline (as `feed` "
              "publishes the bars of one bar time: bars of many symbols closing at the same moment); the other "
              "steps spread each period's bars evenly.", "",
              f"Targets: p50 <= 1 ms, p99 <= {TARGET_P99_MS:g} ms. Highest fleet rate (bars spread) with p99 <= "
              f"{TARGET_P99_MS:g} ms in this run: **{f'{best:,.0f} bars/s' if best else 'none of the steps'}**.",
              MARK_END]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=100)
    ap.add_argument("--rates", default="1,2,5,10", help="bars per second per worker, one step each")
    ap.add_argument("--together", default="1", help="bars per second per worker, one step each, every series' "
                    "bar of a tick published at once (as `feed` publishes one bar time); '' for none")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each step")
    ap.add_argument("--inference", choices=("local", "mock"), default="local")
    ap.add_argument("--nice", type=int, help="the workers' process.nice (default: local-integration's)")
    ap.add_argument("--start-timeout", type=float, default=600.0)
    ap.add_argument("--write", action="store_true", help="update docs/benchmarks.md with these figures (default: print only)")
    args = ap.parse_args()
    args.rates = [float(x) for x in args.rates.split(",")]
    args.together = [float(x) for x in args.together.split(",") if x]
    res = run(args)
    section = report(res, " ".join(["python bench/live_latency.py", *sys.argv[1:]]))
    print(section)
    if args.write:
        write_section(section)


if __name__ == "__main__":
    main()
