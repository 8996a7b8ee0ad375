"""Fixtures: one BigQuery emulator per test session (servers.bq_endpoint)."""

from __future__ import annotations

from tests.integration.bigquery.servers import bq_endpoint  # noqa: F401 - a fixture
