"""Rich tables the CLI prints. Formatting only: no loading, no computing."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Group
from rich.table import Table
from rich.text import Text


def workers_table(specs: Sequence) -> Table:
    t = Table(title=f"{len(specs)} workers (client x strategy x symbol x timeframe)")
    for col in ("worker", "models", "aggregation", "routing", "exposure budget"):
        t.add_column(col)
    for s in specs:
        models = ", ".join(f"{m.model_id}>={m.confidence_threshold:g}" for m in s.strategy.models)
        t.add_row(s.id, models, s.strategy.aggregation.value, s.routing.value, f"{s.exposure_budget:.3f}")
    return t


def cards_table(cards: Sequence) -> Table:
    t = Table(title="model registry")
    for col in ("model", "version", "dir", "horizon", "target", "train window", "val AUC", "log loss", "created"):
        t.add_column(col)
    for c in cards:
        w = c.training_window
        t.add_row(c.model_id, c.version, f"{c.direction:+d}", str(c.horizon_bars), f"{c.target_return:.4f}",
                  f"{w.start:%Y-%m-%d}..{w.end:%Y-%m-%d}", f"{c.metrics.auc:.4f}", f"{c.metrics.log_loss:.4f}",
                  f"{c.created_at:%Y-%m-%d %H:%M}")
    return t


def parity_table(report) -> Table:
    t = Table(title="ONNX Runtime vs LightGBM: same rows, both backends")
    for col in ("model", "version", "rows", "max |diff|", "mean |diff|", "client.strategy", "threshold", "flips"):
        t.add_column(col)
    for r in report.rows:
        t.add_row(r.model_id, r.version, str(r.rows), f"{r.max_abs_diff:.3e}", f"{r.mean_abs_diff:.3e}",
                  f"{r.client_id}.{r.strategy_id}", f"{r.threshold:g}", str(r.flips))
    return t


def summary_table(report) -> Group:
    t = Table(title=f"run {report.run_id} ({report.mode}, {report.environment})")
    for col in ("client", "strategy", "workers", "bars", "signals", "rejected", "rejections by reason",
                "bar rejections", "elapsed s", "bars/s"):
        t.add_column(col, justify="right" if col not in ("client", "strategy", "rejections by reason") else "left")
    for s in report.stats.values():
        reasons = ", ".join(f"{k}={v}" for k, v in s.rejections.most_common())
        bad_bars = ", ".join(f"{k}={v}" for k, v in s.bar_rejections.most_common()) or "0"
        t.add_row(s.client_id, s.strategy_id, str(s.workers), f"{s.bars:,}", f"{s.signals:,}", f"{s.rejected:,}",
                  reasons, bad_bars, f"{s.elapsed_s:.2f}", f"{s.bars_per_s:,.0f}")
    tot = report.totals
    footer = Text(f"total: {tot['bars']:,} bars, {tot['signals']:,} signals, {tot['rejections']:,} rejected, "
                  f"{report.elapsed_s:.2f} s, {tot['bars'] / max(report.elapsed_s, 1e-9):,.0f} bars/s, "
                  f"peak RSS {report.peak_rss_mb:.0f} MB")
    problems = [Text(f"model health: {p}", style="yellow") for p in report.problems]
    return Group(t, footer, *problems)
