"""The run summary on an 80-column terminal, the JSON report, and what `run` exits with."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from rich.console import Console
from typer.testing import CliRunner

from signalgen.modes.base import RunReport, StrategyStats
from signalgen.report import report_dict, summary_table


def big_report(status: str = "ok") -> RunReport:
    """Counts as large as a year of 1-minute bars over many symbols, long names."""
    a = StrategyStats("ikenna", "swing_high_v1", workers=12, bars=12_345_678, signals=3_391_234,
                      rejected=8_954_444, elapsed_s=1234.5,
                      rejections=Counter(below_confidence=8_123_456, volatility_filter=733_912,
                                         trend_unconfirmed=97_076),
                      bar_rejections=Counter(gap=1_234, non_finite=56))
    b = StrategyStats("christian", "mean_reversion_long_horizon_v2", workers=3, bars=987_654, signals=33_912,
                      rejected=953_742, elapsed_s=98.7, rejections=Counter(no_consensus=953_742))
    return RunReport(run_id="20250301T120000Z-0123abcd", mode="historical", environment="local-dev",
                     stats={("ikenna", "swing_high_v1"): a, ("christian", "mean_reversion_long_horizon_v2"): b},
                     elapsed_s=1333.2, peak_rss_mb=1_234.0, status=status,
                     problems=["model swing_low 1.0.0: 3 NaN outputs in 1,000"],
                     failures={"odum.momentum_v1.SOLUSD.5m": "var/data/SOLUSD_5m.csv: missing column 'close'"})


def demo_report() -> RunReport:
    """The size of the demo run: the per-strategy table fits 80 columns."""
    stats = {(c, s): StrategyStats(c, s, workers=2, bars=33_984, signals=4_571, rejected=29_413, elapsed_s=5.3,
                                   rejections=Counter(below_confidence=29_025, volatility_filter=388))
             for c, s in (("christian", "consensus_v1"), ("ikenna", "swing_high_v1"), ("odum", "momentum_v1"))}
    return RunReport(run_id="20250301T120000Z-0123abcd", mode="historical", environment="local-dev", stats=stats,
                     elapsed_s=9.05, peak_rss_mb=377.0)


def render(report: RunReport, width: int = 80) -> str:
    console = Console(width=width, record=True, color_system=None)
    console.print(summary_table(report))
    return console.export_text()


@pytest.mark.parametrize(("make", "layout"), [(demo_report, "table"), (big_report, "lines")])
def test_every_count_is_shown_in_full_at_80_columns(make, layout: str) -> None:
    report = make()
    text = render(report)
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    assert ("client.strategy" in text) == (layout == "table")  # a table only where it fits
    for s in report.stats.values():
        for n in (s.bars, s.signals, s.rejected, s.bar_rejections.total(), *s.rejections.values(),
                  *s.bar_rejections.values()):
            assert f"{n:,}" in text, n
        assert f"{s.bars_per_s:,.0f}" in text
    for n in report.totals.values():
        assert f"{n:,}" in text


def test_failures_and_problems_are_in_the_summary() -> None:
    text = " ".join(render(big_report("failed")).split())
    assert "failed" in text.split("\n")[0] or "): failed" in text
    assert "odum.momentum_v1.SOLUSD.5m: var/data/SOLUSD_5m.csv: missing column 'close'" in text
    assert "problem: model swing_low 1.0.0: 3 NaN outputs in 1,000" in text


def test_report_json_has_everything_the_summary_shows() -> None:
    data = json.loads(json.dumps(report_dict(big_report("failed"))))
    assert data["run_id"] == "20250301T120000Z-0123abcd" and data["status"] == "failed"
    assert data["totals"] == {"bars": 13_333_332, "signals": 3_425_146, "rejections": 9_908_186,
                              "bar_rejections": 1_290}
    ikenna = data["strategies"][0]
    assert ikenna["rejections_by_reason"]["below_confidence"] == 8_123_456
    assert ikenna["bar_rejections"] == {"gap": 1_234, "non_finite": 56}
    assert data["failures"] == {"odum.momentum_v1.SOLUSD.5m": "var/data/SOLUSD_5m.csv: missing column 'close'"}
    assert data["problems"] == ["model swing_low 1.0.0: 3 NaN outputs in 1,000"]


@pytest.fixture
def logger_restored():
    """The CLI configures the `signalgen` logger; put it back so other tests' caplog still works."""
    import logging

    logger = logging.getLogger("signalgen")
    saved = (logger.level, list(logger.handlers), logger.propagate)
    yield
    logger.setLevel(saved[0])
    logger.handlers[:], logger.propagate = saved[1], saved[2]


@pytest.mark.parametrize(("status", "code"), [("ok", 0), ("failed", 1)])
def test_run_exits_1_after_the_summary_when_a_worker_failed(monkeypatch, logger_restored, tmp_path, status: str,
                                                             code: int) -> None:
    import signalgen.modes
    from signalgen import cli
    from tests.roots import REPO, copy_config

    # run_mode is ours (not a library); the CLI's job is to print the report and map its status
    monkeypatch.setattr(signalgen.modes, "run_mode", lambda cfg, **_options: big_report(status))
    (copy_config(tmp_path) / "registry").symlink_to(REPO / "registry")
    result = CliRunner().invoke(cli.app, ["run", "--output", "json", "--root", str(tmp_path)])
    assert result.exit_code == code, result.output
    assert json.loads(result.stdout)["status"] == status
