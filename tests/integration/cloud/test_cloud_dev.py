"""cloud-dev gives the decisions local-dev gives: the same config and bars stored in BigQuery (through
the emulator) and in DuckDB are equal, column for column, apart from what differs between any two
runs (run id, generation time, compute latency)."""

from __future__ import annotations

from contextlib import nullcontext

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from signalgen.config.loader import load_environment
from signalgen.storage import store_for
from signalgen.storage.reads import ReadQuery
from tests.integration.cloud.conftest import cli, cloud_dev

pytestmark = pytest.mark.integration  # the Pub/Sub and BigQuery emulators

PER_RUN = ["run_id", "generated_at", "latency_us"]
RANGE = ("--start", "2025-01-01", "--end", "2025-01-03")


def decisions(cloud: dict, env: str, kind: str, client: str) -> pl.DataFrame:
    with cloud_dev(cloud) if env == "cloud-dev" else nullcontext():
        environment = load_environment(env, root=cloud["root"])
    df = store_for(environment, cloud["root"]).read(ReadQuery(kind=kind, clients=(client,)))
    key = "signal_id" if kind == "signals" else "rejection_id"
    return df.drop([c for c in PER_RUN if c in df.columns]).sort(key)


@pytest.mark.parametrize("client", ["ikenna", "odum"])
def test_historical_on_cloud_dev_stores_what_local_dev_stores(cloud, client):
    for env in ("local-dev", "cloud-dev"):
        done = cli(cloud, "run", "--env", env, "--mode", "historical", "--client", client, *RANGE)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for kind in ("signals", "rejections"):
        local, cloud_rows = (decisions(cloud, env, kind, client) for env in ("local-dev", "cloud-dev"))
        assert local.height > 0
        assert_frame_equal(cloud_rows, local)
