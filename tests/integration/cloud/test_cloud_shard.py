"""A sharded backfill on cloud-dev: 4 `run --shard i/4` processes, started together, store in BigQuery
(the emulator) exactly the decisions one unsharded run stores — the same ids and rows, none twice —
and each records its shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from signalgen.process.shard import shard_index
from tests.integration.cloud.conftest import cli
from tests.integration.cloud.test_cloud_dev import RANGE, decisions
from tests.roots import REPO

pytestmark = pytest.mark.integration  # the Pub/Sub and BigQuery emulators

CLIENTS = ("christian", "ikenna", "odum")
SHARDS = 4


def with_prefix(cloud: dict) -> dict:
    """`cloud` under dataset and topic prefixes of its own: a store no other run of the test writes."""
    tag = "t" + uuid.uuid4().hex[:8]
    return {**cloud, "vars": {**cloud["vars"], "SIGNALGEN_STORAGE__DATASET_PREFIX": tag,
                              "SIGNALGEN_MESSAGING__TOPIC_PREFIX": tag}}


def test_four_shard_runs_together_store_exactly_what_one_run_stores(cloud):
    run = ("run", "--env", "cloud-dev", "--mode", "historical", *RANGE, "--no-progress", "--output", "json")
    env = {**os.environ, **cloud["vars"], "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    shards = [subprocess.Popen([sys.executable, str(REPO / "strategy_runner.py"), *run, "--shard", f"{i}/{SHARDS}",
                                "--root", str(cloud["root"])], cwd=cloud["root"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for i in range(SHARDS)]
    outcomes = [p.communicate(timeout=600) for p in shards]
    for p, (out, err) in zip(shards, outcomes):
        assert p.returncode == 0, err[-3000:]
    reports = [json.loads(out) for out, _ in outcomes]

    whole = with_prefix(cloud)  # the same run, unsharded, into a store of its own
    done = cli(whole, *run)
    assert done.returncode == 0, done.stderr[-3000:]

    # each shard ran its share of the workers; together all of them, once
    specs = json.loads(cli(cloud, "config", "validate", "--env", "cloud-dev", "--output", "json").stdout)["workers"]
    for i, report in enumerate(reports):
        assert report["shard"] == f"{i}/{SHARDS}"
        assert sum(s["workers"] for s in report["strategies"]) == sum(shard_index(w["id"], SHARDS) == i for w in specs)
    assert sum(r["totals"]["bars"] for r in reports) == json.loads(done.stdout)["totals"]["bars"] > 0

    for client in CLIENTS:
        for kind, key in (("signals", "signal_id"), ("rejections", "rejection_id")):
            sharded, single = decisions(cloud, "cloud-dev", kind, client), decisions(whole, "cloud-dev", kind, client)
            assert single.height > 0 and sharded[key].n_unique() == sharded.height  # none twice
            assert_frame_equal(sharded, single)

    runs = [json.loads(cli(cloud, "runs", "show", r["run_id"], "--env", "cloud-dev", "--output", "json").stdout)
            for r in reports]
    assert sorted((r["shard"], r["status"]) for r in runs) == [(f"{i}/{SHARDS}", "ok") for i in range(SHARDS)]
    assert pl.Series([r["signals"] for r in runs]).sum() == sum(
        decisions(cloud, "cloud-dev", "signals", c).height for c in CLIENTS)
