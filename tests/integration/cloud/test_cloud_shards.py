"""Proof without a cluster: three managers as separate processes, `start --shard i/3` on cloud-dev
(the Pub/Sub emulator, the BigQuery emulator, a PostgreSQL control store of this test). Every worker
runs exactly once, in the shard rendezvous hashing gives it; killing one manager with SIGKILL stops
only its share; started again, it resumes from the checkpoints, and BigQuery holds exactly the
decisions of a historical run over the same bars: nothing lost, nothing twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml
from polars.testing import assert_frame_equal

from signalgen.config.loader import load_config
from signalgen.config.workers import worker_specs
from signalgen.process.shard import take_shard
from tests.integration.cloud.conftest import cli, cloud_dev
from tests.integration.cloud.test_cloud_dev import RANGE, decisions, wait_for
from tests.integration.postgres.test_control_postgres import query
from tests.roots import REPO

pytestmark = pytest.mark.integration

CLIENTS = ("christian", "ikenna", "odum")
KINDS = ("signals", "rejections")
FAST = {"heartbeat_interval_s": 0.2, "heartbeat_threshold_s": 20.0, "stop_timeout_s": 10.0, "resource_sample_s": 1.0}


def start(cloud: dict, index: int) -> subprocess.Popen:
    env = {**os.environ, **cloud["vars"], "PYTHONPATH": str(REPO)}
    out = (cloud["root"] / f"manager-{index}.out").open("ab")
    return subprocess.Popen([sys.executable, str(REPO / "strategy_runner.py"), "start", "--env", "cloud-dev",
                             "--mode", "simulation", "--shard", f"{index}/3", "--root", str(cloud["root"])],
                            cwd=cloud["root"], env=env, stdout=out, stderr=subprocess.STDOUT)


def output(cloud: dict) -> str:
    return "\n".join(f"--- manager {i}\n" + (cloud["root"] / f"manager-{i}.out").read_text()[-2000:]
                     for i in range(3) if (cloud["root"] / f"manager-{i}.out").exists())


def dead_letters(cloud: dict) -> dict[str, dict[str, int]]:
    """What the recorder's subscriptions dead-lettered, per internal topic: by our reason, or
    "policy" for a message Pub/Sub forwarded itself after max_delivery_attempts (nacks and expired
    leases both count). For the failure message: a decision missing from BigQuery may be here."""
    from google.cloud import pubsub_v1

    from signalgen.brokers.pubsub import RECORDER_GROUP, TopicNames, subscription_path

    names, out = TopicNames(cloud["vars"]["SIGNALGEN_MESSAGING__TOPIC_PREFIX"]), {}
    subscriber = pubsub_v1.SubscriberClient()
    try:
        for client in CLIENTS:
            for topic in names.internal_topics("simulation", client):
                dead = names.deadletter(names.subscription(topic, RECORDER_GROUP))
                reasons: dict[str, int] = {}
                while True:
                    got = subscriber.pull(request={"subscription": subscription_path("signalgen-dev", dead),
                                                   "max_messages": 1000, "return_immediately": True},
                                          retry=None, timeout=10).received_messages
                    for m in got:
                        reason = m.message.attributes.get("reason", "policy")
                        reasons[reason] = reasons.get(reason, 0) + 1
                    if not got:
                        break
                if reasons:
                    out[topic] = reasons
    except Exception as exc:  # noqa: BLE001 - a diagnosis, never the failure itself
        out["error"] = {repr(exc)[:200]: 1}
    finally:
        subscriber.close()
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    tree = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()
    proc.wait(30)
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


KILL_OPEN = pytest.mark.xfail(strict=False, reason=(
    "open (issue 18): every step up to the last passes (each worker once in its shard, one lease each, the kill "
    "stops only its share, the others beat on, status exit 3, the restart seeds the checkpoints and runs its share "
    "again), but BigQuery stays short: 2026-12-05, want 5,184 decisions, stored 5,168 after 600 s of waiting (now 300) (16 missing, 10 "
    "of them of christian, whose workers run in the shards never killed: lost on the recorder side, among messages "
    "the killed manager's recorder held). A plain subscriber killed with -9 on the emulator has its leased messages "
    "redelivered in 10 s (checked), so it is not simply the emulator's lease. A second run (quiet machine): "
    "signals complete, rejections short by 9 (christian), 22 (ikenna, all in the killed shard) and 8 (odum); only 3 "
    "of the 39 in the recorder's dead-letter topics (forwarded by Pub/Sub's policy); undiagnosed"))


@pytest.mark.timeout(1500)  # three managers, nine workers and two emulators on a small shared machine
@pytest.mark.parametrize("kill", [False, pytest.param(True, marks=KILL_OPEN)], ids=["undisturbed", "one-killed"])
def test_three_sharded_managers_run_each_worker_once_and_a_killed_one_resumes_with_nothing_lost(cloud, pg_dsn,
                                                                                                kill: bool):
    root = cloud["root"]
    env_file = root / "environments" / "cloud-dev.yaml"
    env = yaml.safe_load(env_file.read_text())
    env["process"] = {**env["process"], **FAST}
    env["control"]["lease_ttl_s"] = 3
    env_file.write_text(yaml.safe_dump(env, sort_keys=False))
    mode_file = root / "modes" / "simulation.yaml"  # paced, so that a manager can be killed mid-run
    mode_file.write_text(mode_file.read_text().replace("replay_speed: 0 ", "replay_speed: 3000 "))
    done = cli(cloud, "run", "--env", "local-dev", "--mode", "historical", *RANGE)
    assert done.returncode == 0, done.stderr[-2000:]
    want = {client: {kind: decisions(cloud, "local-dev", kind, client).drop("mode") for kind in KINDS}
            for client in CLIENTS}
    with cloud_dev(cloud):
        specs = worker_specs(load_config("cloud-dev", "simulation", root=root))
    shard_of = {s.id: f"{i}/3" for i in range(3) for s in take_shard(specs, i, 3)}
    assert len(shard_of) == len(specs) == 9 and len(set(shard_of.values())) == 3

    managers = [start(cloud, i) for i in range(3)]
    try:
        def instances() -> dict[str, dict]:
            try:
                return {r["id"]: r for r in query(pg_dsn, "SELECT * FROM strategy_instances")}
            except Exception:  # noqa: BLE001 - no table yet
                return {}

        wait_for(lambda: len(rows := instances()) == 9 and all(r["state"] == "RUNNING" for r in rows.values()),
                 240, f"9 RUNNING workers\n{output(cloud)}")
        rows = instances()
        assert {w: r["shard"] for w, r in rows.items()} == shard_of  # each worker once, in its own shard
        leases = query(pg_dsn, "SELECT shard, pid FROM manager_leases ORDER BY shard")
        assert [(x["shard"], x["pid"]) for x in leases] == [(f"{i}/3", m.pid) for i, m in enumerate(managers)]
        for w, r in rows.items():  # run by its own manager's process tree, nowhere else
            owner = managers[int(shard_of[w][0])]
            assert r["pid"] in {p.pid for p in psutil.Process(owner.pid).children(recursive=True)}, w

        victim = [w for w, s in shard_of.items() if s == "1/3"] if kill else []
        if kill:
            others = [w for w in shard_of if w not in victim]
            wait_for(lambda: len(query(pg_dsn, "SELECT * FROM worker_state WHERE worker_id = ANY(%s)", victim))
                     == len(victim), 120, "checkpoints of shard 1/3 mirrored")
            kill_tree(managers[1])
            killed_at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() + 1))
            time.sleep(4)  # over the lease's TTL

            def beats() -> dict[str, str]:
                return {r["worker_id"]: r["ts"] for r in query(pg_dsn, "SELECT worker_id, ts FROM heartbeats")}
            seen = beats()
            assert all(seen[w] < killed_at for w in victim), seen  # its share stopped with it
            time.sleep(2)
            later = beats()
            assert all(later[w] > seen[w] for w in others), (seen, later)  # the others' run on
            assert all(later[w] == seen[w] for w in victim)
            status = cli(cloud, "status", "--env", "cloud-dev")
            assert status.returncode == 3 and "1/3 pid" in status.stdout and "lease expired" in status.stdout, status
            assert {rows[w]["state"] for w in others} == {"RUNNING"}

            managers[1] = start(cloud, 1)
            wait_for(lambda: all(r["state"] == "RUNNING" and r["restarts"] == 0 and r["pid"] in {
                p.pid for p in psutil.Process(managers[1].pid).children(recursive=True)}
                for w, r in instances().items() if w in victim), 240, f"shard 1/3 running again\n{output(cloud)}")
            assert "worker checkpoints seeded" in (root / "manager-1.out").read_text()

        wanted, stored = {(c, k): want[c][k].height for c in CLIENTS for k in KINDS}, {}

        def complete() -> bool:
            stored.update({(c, k): decisions(cloud, "cloud-dev", k, c).height for c in CLIENTS for k in KINDS})
            return all(n >= wanted[key] for key, n in stored.items())
        try:
            wait_for(complete, 300, f"every decision in BigQuery: want {wanted}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; stored {stored}; dead-lettered {dead_letters(cloud)}\n{output(cloud)}") from None
    finally:
        stopped = cli(cloud, "stop", "--env", "cloud-dev", timeout=300)
        for m in managers:
            try:
                m.wait(timeout=120)
            except subprocess.TimeoutExpired:
                kill_tree(m)
    assert stopped.returncode == 0 and "manager stopped" in stopped.stdout, stopped.stdout + stopped.stderr
    assert [m.returncode for m in managers] == [0, 0, 0], output(cloud)
    assert query(pg_dsn, "SELECT * FROM manager_leases") == []
    for client in CLIENTS:
        for kind, rows in want[client].items():
            got = decisions(cloud, "cloud-dev", kind, client)
            assert set(got["mode"]) <= {"simulation"}
            assert_frame_equal(got.drop("mode"), rows)
