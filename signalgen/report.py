"""Rich tables the CLI prints. Formatting only: no loading, no computing."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import polars as pl
from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.segment import Segment
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


def _numbers_table(title: str, text_cols: Sequence[str], num_cols: Sequence[str], rows: list[list[str]]) -> Table:
    """A compact table whose number columns never shrink below their widest cell.

    Rich cuts cells (`33,9…`) when a table is wider than the terminal; text columns fold instead,
    and the number columns keep their full width, so an 80-column terminal shows every count.
    """
    # one space between columns (the box's separator), no padding: numbers keep the room
    t = Table(title=title, box=box.SIMPLE_HEAD, padding=0, title_justify="left", show_edge=False)
    for col in text_cols:
        t.add_column(col, overflow="fold")
    for i, col in enumerate(num_cols, start=len(text_cols)):
        width = max([len(r[i]) for r in rows] + [min(len(col), 7)])
        t.add_column(col, justify="right", no_wrap=True, min_width=width)
    for r in rows:
        t.add_row(*r)
    return t


class Fit:
    """Renders `wide` when its natural width fits the terminal, else `narrow` (text that wraps).

    Rich fits a too-wide table by cutting cells (`33,9…`); a count must never be cut.
    """

    def __init__(self, wide: Any, narrow: Any) -> None:
        self.wide, self.narrow = wide, narrow

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        # the width it takes when nothing limits it (Measurement over-counts a table's padding)
        lines = console.render_lines(self.wide, options.update(width=10_000), pad=False)
        fits = max((Segment.get_line_length(line) for line in lines), default=0) <= options.max_width
        yield self.wide if fits else self.narrow


def summary_table(report) -> Group:
    """The end-of-run summary: per-strategy counts, rejections by reason, failures and problems.

    Fits an 80-column terminal without cutting a number: reasons are lines under the table, not
    a column of it.
    """
    status_style = {"ok": "green", "failed": "bold red", "stopped": "yellow"}.get(report.status, "")
    title = f"run {report.run_id} ({report.mode}, {report.environment}): [{status_style}]{report.status}[/]"
    rows = [[f"{s.client_id}.{s.strategy_id}", f"{s.workers:,}", f"{s.bars:,}", f"{s.signals:,}",
             f"{s.rejected:,}", f"{s.bar_rejections.total():,}", f"{s.bars_per_s:,.0f}"]
            for s in report.stats.values()]
    cols = ("workers", "bars", "signals", "rejected", "bad bars", "bars/s")
    t = _numbers_table(title, ("client.strategy",), cols, rows)
    lines = [Text.from_markup(title)] + [Text(f"  {r[0]}: " + ", ".join(f"{v} {c}" for c, v in zip(cols, r[1:])))
                                         for r in rows]
    parts: list[Any] = [Fit(t, Group(*lines))]
    reasons = [(s, s.rejections, s.bar_rejections) for s in report.stats.values()
               if s.rejections or s.bar_rejections]
    if reasons:
        parts.append(Text("rejections by reason (a candidate may have several; bad bars marked bar:)",
                          style="bold"))
    for s, cand, bars in reasons:
        items = [f"{k}={v:,}" for k, v in cand.most_common()] + [f"bar:{k}={v:,}" for k, v in bars.most_common()]
        parts.append(Text(f"  {s.client_id}.{s.strategy_id}: " + ", ".join(items)))
    tot = report.totals
    parts.append(Text(f"total: {tot['bars']:,} bars, {tot['signals']:,} signals, {tot['rejections']:,} rejected, "
                      f"{report.elapsed_s:,.2f} s, {tot['bars'] / max(report.elapsed_s, 1e-9):,.0f} bars/s, "
                      f"peak RSS {report.peak_rss_mb:,.0f} MB"))
    if report.failures:
        parts.append(Text(f"{len(report.failures)} failed workers:", style="bold red"))
        parts.extend(Text(f"  {worker}: {why}", style="red") for worker, why in sorted(report.failures.items()))
    parts.extend(Text(f"problem: {p}", style="yellow") for p in report.problems)
    return Group(*parts)


def report_dict(report) -> dict[str, Any]:
    """The run report as plain JSON-ready data (`run --output json`)."""
    return {
        "run_id": report.run_id, "mode": str(report.mode), "environment": str(report.environment),
        "status": report.status, "elapsed_s": round(report.elapsed_s, 3),
        "peak_rss_mb": round(report.peak_rss_mb, 1), "totals": report.totals,
        "rejections_by_reason": dict(report.rejections_by_reason.most_common()),
        "strategies": [{"client": s.client_id, "strategy": s.strategy_id, "workers": s.workers, "bars": s.bars,
                        "signals": s.signals, "rejected": s.rejected,
                        "rejections_by_reason": dict(s.rejections.most_common()),
                        "bar_rejections": dict(s.bar_rejections.most_common()),
                        "elapsed_s": round(s.elapsed_s, 3), "bars_per_s": round(s.bars_per_s, 1)}
                       for s in report.stats.values()],
        "failures": dict(report.failures), "problems": list(report.problems),
    }


# ---------------------------------------------------------------- stored records (signals, runs)


def _when(t: datetime | None) -> str:
    return "" if t is None else f"{t:%Y-%m-%d %H:%M:%S}"


def records_table(df: pl.DataFrame, kind: str, *, show_header: bool = True) -> Table:
    """Signals or rejections as read from the store; the mode is always a column."""
    last = ("reasons",) if kind == "rejections" else ("strength", "weight")
    t = Table(box=box.SIMPLE_HEAD, padding=(0, 1), show_header=show_header, show_edge=False)
    for col in ("bar_time (UTC)", "client", "strategy", "symbol", "tf", "mode", "dir", "conf", *last):
        t.add_column(col, no_wrap=col in ("bar_time (UTC)", "dir", "conf", "strength", "weight"),
                     justify="right" if col in ("dir", "conf", "strength", "weight") else "left",
                     overflow="fold")
    for r in df.iter_rows(named=True):
        tail = ([", ".join(r["reasons"] or ())] if kind == "rejections"
                else [f"{r['strength']:.4f}", f"{r['weight']:.4f}"])
        t.add_row(_when(r["bar_time"]), r["client_id"], r["strategy_id"], r["symbol"], r["timeframe"], r["mode"],
                  f"{r['direction']:+d}" if r["direction"] else "0", f"{r['confidence']:.4f}", *tail)
    return t


def flat_records(df: pl.DataFrame) -> pl.DataFrame:
    """Nested columns as text for CSV: `models` as a JSON array, `reasons` joined by `;`."""
    exprs = []
    if "models" in df.columns:
        exprs.append(pl.concat_str(pl.lit("["), pl.col("models").list.eval(pl.element().struct.json_encode())
                                   .list.join(","), pl.lit("]")).alias("models"))
    if "reasons" in df.columns:
        exprs.append(pl.col("reasons").list.join(";"))
    if "clients" in df.columns:
        exprs.append(pl.col("clients").list.join(";"))
    return df.with_columns(exprs) if exprs else df


RUN_LIST_COLUMNS = ("run_id", "mode", "environment", "status", "started_at", "elapsed_s", "bars", "signals",
                    "rejections")


def runs_table(df: pl.DataFrame) -> Table:
    """One line per run, newest first."""
    rows = [[r["run_id"], r["mode"], r["status"] or "running", _when(r["started_at"]),
             "" if r["elapsed_s"] is None else f"{r['elapsed_s']:,.1f}",
             *("" if r[c] is None else f"{r[c]:,}" for c in ("bars", "signals", "rejections"))]
            for r in df.iter_rows(named=True)]
    return _numbers_table(f"{df.height} runs (newest first)", ("run", "mode", "status", "started (UTC)"),
                          ("s", "bars", "signals", "rejected"), rows)


def run_dict(row: dict[str, Any]) -> dict[str, Any]:
    """A `runs` row as JSON-ready data: times in ISO 8601, its JSON columns decoded."""
    from signalgen.storage.base import RUN_JSON

    out = {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()}
    for k in RUN_JSON:
        if isinstance(out.get(k), str):
            out[k] = json.loads(out[k])
    return out


_PROVENANCE = ("data_source", "seed", "data_files", "config")
_DIGEST_SHOWN = 16  # hex digits of a file's sha256 in the table (JSON has all 64)


def run_detail(row: dict[str, Any]) -> Group:
    """Every stored field of one run, what produced its bars, then its rejections by reason."""
    data = run_dict(row)
    reasons = data.pop("rejections_by_reason", None) or {}
    files = data.pop("data_files", None) or {}
    config = data.pop("config", None)
    t = Table(box=box.SIMPLE, show_header=False, padding=(0, 1))
    t.add_column("field", style="bold")
    t.add_column("value", overflow="fold")
    for k, v in data.items():
        if isinstance(v, list):
            v = ", ".join(map(str, v))
        t.add_row(k, "not recorded" if v is None and k in _PROVENANCE else "" if v is None
                  else str(v) if k == "seed" else f"{v:,}" if isinstance(v, int)
                  else f"{v:,.2f}" if isinstance(v, float) else str(v))
    if "config" in row:  # a store from before provenance was kept has no such column
        t.add_row("config", "not recorded" if config is None
                  else "recorded, secrets redacted (`--output json` shows it)")
    lines = [Text(f"  {k}={v:,}") for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])]
    shown = [Text(f"  {name}  {digest[:_DIGEST_SHOWN]}") for name, digest in files.items()]
    return Group(t, *([Text("data files (sha256)", style="bold")] + shown if shown else []),
                 *([Text("rejections by reason", style="bold")] + lines if lines else []))
