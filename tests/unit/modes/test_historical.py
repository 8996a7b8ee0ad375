"""historical and mock runs end to end on the demo clients: store, CSV, stream, idempotency, routing."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import polars as pl

from signalgen.config.loader import Overrides, load_config
from signalgen.modes import run_mode

START = datetime(2025, 1, 1, tzinfo=timezone.utc)
END = datetime(2025, 1, 8, tzinfo=timezone.utc)  # 7 days = 2016 five-minute bars per worker
BARS_PER_WORKER = 2016
DAILY_BARS_PER_WORKER = 7  # ada's daily demo strategy: 1d bars


def bars_per_worker(client: str) -> int:
    return DAILY_BARS_PER_WORKER if client == "ada" else BARS_PER_WORKER


def run(root: Path, mode: str = "historical", **overrides):
    cfg = load_config("local-dev", mode, root=root, overrides=Overrides(start=START, end=END, **overrides))
    return cfg, run_mode(cfg)


def table(root: Path, sql: str) -> pl.DataFrame:
    with duckdb.connect(str(root / "var/local-dev/signalgen.duckdb"), read_only=True) as con:
        return con.sql(sql).pl()


def csv_rows(root: Path, client: str) -> list[dict]:
    files = sorted((root / "var/local-dev/out/historical/quantconnect" / client).rglob("*.csv"))
    return [row for f in files for row in csv.DictReader(f.open())]


def test_every_bar_becomes_a_signal_or_a_rejection(root):
    cfg, report = run(root)
    assert len(report.stats) == 6  # (client, strategy): ikenna x2, odum x1, christian x2, ada x1
    for (client, _), stats in report.stats.items():
        assert stats.bars == stats.workers * bars_per_worker(client)
        assert stats.signals + stats.rejected == stats.bars
    counts = table(root, "select (select count(*) from signals) s, (select count(*) from rejections) r").row(0)
    assert counts == (report.totals["signals"], report.totals["rejections"])
    assert report.totals["signals"] > 0, "the demo must produce signals"
    runs = table(root, "select mode, environment, status, bars, signals, config_hash from runs")
    assert runs.row(0) == ("historical", "local-dev", "ok", report.totals["bars"], report.totals["signals"],
                           cfg.config_hash)


def test_rerun_adds_no_duplicates(root):
    run(root)
    first = table(root, "select signal_id, direction, confidence, weight from signals order by signal_id")
    csv_first = sorted(r["signal_id"] for r in csv_rows(root, "ikenna"))
    run(root)
    again = table(root, "select signal_id, direction, confidence, weight from signals order by signal_id")
    assert first.equals(again)
    assert table(root, "select count(*) n, count(distinct rejection_id) d from rejections").row(0)[0] == \
        table(root, "select count(distinct rejection_id) from rejections").item()
    assert sorted(r["signal_id"] for r in csv_rows(root, "ikenna")) == csv_first
    assert table(root, "select count(*) from runs").item() == 2


def test_routing_and_tenant_isolation(root):
    run(root)
    out = root / "var/local-dev/out/historical/quantconnect"
    assert {p.name for p in out.iterdir()} == {"ada", "ikenna", "christian"}  # odum is internal-only
    assert {p.name for p in (out / "christian").iterdir()} == {"consensus_v1"}  # reversal_v1 overrides: internal
    stream = root / "var/local-dev/stream/historical"
    assert {p.name for p in stream.iterdir()} <= {"odum.jsonl", "christian.jsonl"}
    for client in ("ikenna", "christian"):
        ids = {r["signal_id"] for r in csv_rows(root, client)}
        owned = set(table(root, f"select signal_id from signals where client_id = '{client}'")["signal_id"])
        assert ids and ids <= owned
    for line in (stream / "odum.jsonl").read_text().splitlines():
        assert json.loads(line)["client_id"] == "odum"


def test_csv_format_for_lean(root):
    run(root)
    files = sorted((root / "var/local-dev/out/historical/quantconnect/ikenna").rglob("*.csv"))
    assert files
    for f in files:
        lines = f.read_text().splitlines()
        assert lines[0] == "time,symbol,direction,confidence,magnitude,weight,period,signal_id,mode"
        times = [line.split(",")[0] for line in lines[1:]]
        assert times == sorted(times)
        assert all(t.startswith(f"{f.stem[:4]}-{f.stem[4:6]}-{f.stem[6:]} ") and len(t) == 19 for t in times)


def test_chunking_does_not_change_signals(root, tmp_path_factory):
    run(root)
    small = tmp_path_factory.mktemp("small")
    for item in root.iterdir():
        if item.name != "var":
            (small / item.name).symlink_to(item)
    cfg = load_config("local-dev", "historical", root=small, overrides=Overrides(start=START, end=END))
    report = run_mode(cfg.model_copy(update={"mode": cfg.mode.model_copy(update={"chunk_bars": 300})}))
    assert all(s.bars == s.workers * bars_per_worker(c) for (c, _), s in report.stats.items())  # no bar evaluated twice
    cols = "signal_id, direction, confidence, strength, magnitude, weight, period"
    a = table(root, f"select {cols} from signals order by signal_id")
    b = table(small, f"select {cols} from signals order by signal_id")
    assert a.height > 0 and a.equals(b)


def test_mock_inference_is_seeded(root):
    _, one = run(root, "mock", inference="mock")
    ids = table(root, "select signal_id, confidence from signals order by signal_id")
    assert one.totals["signals"] > 0
    _, two = run(root, "mock", inference="mock")
    assert table(root, "select signal_id, confidence from signals order by signal_id").equals(ids)
    assert table(root, "select distinct mode from signals").item() == "mock"


def test_only_selected_client_and_strategy(root):
    _, report = run(root, strategies=("swing_high_v1",))
    assert set(report.stats) == {("ikenna", "swing_high_v1")}


def test_cli_run_prints_summary_and_broken_config_exits_2(root):
    cmd = [sys.executable, str(Path(__file__).resolve().parents[3] / "strategy_runner.py"), "run", "--root", str(root),
           "--client", "odum", "--start", "2025-01-01", "--end", "2025-01-02"]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "momentum_v1" in ok.stdout and "bars/s" in ok.stdout
    bad = root / "clients" / "odum.yaml"
    bad.write_text(bad.read_text().replace("confidence_threshold: 0.6", "confidence_threshold: 1.6", 1))
    broken = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert broken.returncode == 2
    assert "odum.yaml" in broken.stderr and "confidence_threshold" in broken.stderr
    assert "Traceback" not in broken.stderr


def test_rerun_with_a_higher_threshold_rewrites_the_csv(root):
    run(root)
    before = {r["signal_id"] for r in csv_rows(root, "ikenna")}
    days_before = {p.name for p in (root / "var/local-dev/out/historical/quantconnect/ikenna").rglob("*.csv")}
    client = root / "clients" / "ikenna.yaml"
    client.write_text(client.read_text().replace("confidence_threshold: 0.6", "confidence_threshold: 0.7"))
    run(root)
    after = {r["signal_id"] for r in csv_rows(root, "ikenna")}
    stored = set(table(root, "select signal_id from signals where client_id = 'ikenna'")["signal_id"])
    assert after == stored and after < before  # signals the new config rejects left the CSV as well
    # day files that lost all their signals are rewritten (header only), not left stale
    assert {p.name for p in (root / "var/local-dev/out/historical/quantconnect/ikenna").rglob("*.csv")} == days_before


def test_rerun_of_part_of_the_range_keeps_the_rest(root):
    run(root)
    full = {(r["time"], r["signal_id"]) for r in csv_rows(root, "christian")}
    client = root / "clients" / "christian.yaml"
    client.write_text(client.read_text().replace("confidence_threshold: 0.55", "confidence_threshold: 0.9"))
    part_start, part_end = datetime(2025, 1, 3, tzinfo=timezone.utc), datetime(2025, 1, 4, 12, tzinfo=timezone.utc)
    cfg = load_config("local-dev", "historical", root=root, overrides=Overrides(start=part_start, end=part_end))
    run_mode(cfg)
    inside = lambda t: "2025-01-03 00:00:00" < t <= "2025-01-04 12:00:00"  # noqa: E731
    now = {(r["time"], r["signal_id"]) for r in csv_rows(root, "christian")}
    assert {x for x in now if not inside(x[0])} == {x for x in full if not inside(x[0])}
    assert {x for x in full if inside(x[0])} - now, "the stricter config must have dropped signals inside"


def test_a_rerun_that_changes_or_withdraws_streamed_signals_says_so_on_the_stream(root):
    """A consumer that keeps the highest revision of each signal_id and drops retractions ends with the
    store's signals. Before: the re-run replaced decisions in the store, the stream only appended changed
    copies, and such a consumer still held every signal the store now records as a rejection."""
    from signalgen.outputs.local import read_stream

    def odum():
        report = run_mode(load_config("local-dev", "historical", root=root, clients=["odum"],
                                      overrides=Overrides(start=START, end=END)))
        assert report.status == "ok"

    stream = root / "var/local-dev/stream/historical/odum.jsonl"
    odum()
    first = read_stream(stream)
    client = root / "clients/odum.yaml"
    client.write_text(client.read_text().replace("confidence_threshold: 0.6", "confidence_threshold: 0.65")
                      .replace("target_volatility: 0.002", "target_volatility: 0.0015"))
    odum()
    stored = table(root, "SELECT CAST(signal_id AS VARCHAR) signal_id, weight FROM signals "
                         "WHERE client_id = 'odum' ORDER BY signal_id")
    current = read_stream(stream).sort("signal_id")
    assert current.select("signal_id", "weight").equals(stored)
    lines = read_stream(stream, dedupe=False)
    withdrawn = set(first["signal_id"]) - set(stored["signal_id"])
    assert withdrawn and set(lines.filter("retracted")["signal_id"]) == withdrawn
    assert lines.filter("retracted")["revision"].unique().to_list() == [1]
    resized = lines.filter((pl.col("revision") == 1) & ~pl.col("retracted"))
    assert resized.height > 0 and set(resized["signal_id"]) <= set(first["signal_id"])
    kept = stream.read_bytes()
    odum()
    assert stream.read_bytes() == kept  # nothing changed: nothing appended
