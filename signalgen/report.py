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


def workers_table(specs: Sequence, *, wide: bool = False) -> Table:
    """The workers a config runs. Narrow (80 columns): worker, models with thresholds, routing; wide adds
    the aggregation and the exposure budget."""
    title = f"{len(specs)} workers (client x strategy x symbol x timeframe)"
    cols = ("worker", "models", "routing", *(("aggregation", "exposure budget") if wide else ()))
    rows = []
    for s in specs:
        models = ", ".join(f"{m.model_id}>={m.confidence_threshold:g}" for m in s.strategy.models)
        extra = (s.strategy.aggregation.value, f"{s.exposure_budget:.3f}") if wide else ()
        rows.append([s.id, models, s.routing.value, *extra])
    return _table(title, cols, rows)


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


def _table(title: str | None, columns: Sequence[str], rows: list[list[Any]], *, numbers: Sequence[str] = (),
           show_header: bool = True) -> Table:
    """A compact table whose number columns (`numbers`, right-aligned) never shrink below their widest cell.

    Rich cuts cells (`33,9…`) when a table is wider than the terminal; text columns fold instead,
    and the number columns keep their full width, so an 80-column terminal shows every count.
    Cells are plain text (markup is not parsed: ids and reasons come from outside) or rich Text.
    """
    # one space between columns (the box's separator), no padding: numbers keep the room
    t = Table(title=title, box=box.SIMPLE_HEAD, padding=0, title_justify="left", show_edge=False,
              show_header=show_header)
    for i, col in enumerate(columns):
        if col in numbers:
            width = max([len(str(r[i])) for r in rows] + [min(len(col), 7)])
            t.add_column(col, justify="right", no_wrap=True, min_width=width)
        else:
            t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(*(c if isinstance(c, Text) else Text(str(c)) for c in r))
    return t


def duration(seconds: float) -> str:
    """`4.2s`, `35s`, `3m07s`, `2h05m`, `12d03h`: short enough for a narrow column."""
    s = max(seconds, 0.0)
    if s < 10:
        return f"{s:.1f}s"
    s = int(s)
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def clip(text: str, limit: int = 200) -> str:
    """`text` on one line, at most `limit` characters (an echoed excerpt of outside input)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
    where = ", ".join([str(report.mode), str(report.environment)] + ([f"shard {report.shard}"] if report.shard else []))
    title = f"run {report.run_id} ({where}): [{status_style}]{report.status}[/]"
    rows = [[f"{s.client_id}.{s.strategy_id}", f"{s.workers:,}", f"{s.bars:,}", f"{s.signals:,}",
             f"{s.rejected:,}", f"{s.bar_rejections.total():,}", f"{s.bars_per_s:,.0f}"]
            for s in report.stats.values()]
    cols = ("workers", "bars", "signals", "rejected", "bad bars", "bars/s")
    t = _table(title, ("client.strategy", *cols), rows, numbers=cols)
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


_STATE_STYLE = {"RUNNING": "green", "FATAL": "red", "BACKOFF": "yellow", "PAUSED": "cyan", "STARTING": "yellow",
                "UNKNOWN": "magenta"}


def status_table(rows: list[dict], title: str, *, wide: bool = False) -> Group:
    """`status`: one line per worker (worker, state, pid, heartbeat age, signals, restarts), then the
    reason of each worker that is not simply running; `wide` adds uptime, rejections, errors, the exit
    code, the checkpoint and the reason as columns."""
    def n(v: Any) -> str:
        return "" if v is None else f"{v:,}" if isinstance(v, int) else str(v)

    cols = ("worker", "state", "pid", "uptime", "heartbeat", "signals", "rejected", "errors", "restarts", "exit",
            "checkpoint", "reason")
    shown = cols if wide else ("worker", "state", "pid", "heartbeat", "signals", "restarts")
    cells = []
    for r in rows:
        values = {"worker": r["worker"], "state": Text(r["state"], style=_STATE_STYLE.get(r["state"], "")),
                  "pid": str(r["pid"] or ""), "uptime": "" if r["uptime_s"] is None else duration(r["uptime_s"]),
                  "heartbeat": "" if r["last_heartbeat_s"] is None else f"{duration(r['last_heartbeat_s'])} ago",
                  "signals": n(r["signals"]), "rejected": n(r["rejections"]), "errors": n(r["errors"]),
                  "restarts": n(r["restarts"] or 0), "exit": n(r["exit_code"]),
                  "checkpoint": str(r["checkpoint"] or "")[:19], "reason": clip(r["reason"])}
        cells.append([values[c] for c in shown])
    numbers = ("pid", "uptime", "heartbeat", "signals", "rejected", "errors", "restarts", "exit")
    parts: list[Any] = [Text(title), _table(None, shown, cells, numbers=numbers)]
    if not wide:
        parts += [Text(f"  {r['worker']}: {clip(r['reason'])}") for r in rows if r["reason"] not in ("", "ready")]
    parts += [Text(f"  {r['worker']}: {r['paused_keys']} Pub/Sub ordering key(s) paused, publishing retried")
              for r in rows if r.get("paused_keys")]
    return Group(*parts)


def event_dict(row: dict[str, Any]) -> dict[str, Any]:
    """A control-store event for people and programs: `detail` decoded when it holds a JSON object
    (the `state` events), else its text, clipped."""
    detail: Any = row.get("detail") or ""
    if detail.startswith("{"):
        try:
            detail = json.loads(detail)
        except ValueError:
            pass
    return {"ts": row["ts"], "worker": row["worker_id"], "kind": row["kind"],
            "detail": detail if isinstance(detail, dict) else clip(str(detail))}


def _detail_text(detail: Any) -> str:
    """An event's detail on one line: a JSON object as `key=value` pairs (quoted when needed)."""
    from signalgen.logs import field_value

    if isinstance(detail, dict):
        return clip(" ".join(f"{k}={field_value(v)}" for k, v in detail.items() if v is not None and v != ""))
    return clip(str(detail))


def events_table(events: list[dict[str, Any]], *, wide: bool = False) -> Table | Fit:
    """`events`, oldest first: time, worker, event and detail, one line each when that fits the
    terminal (always with `wide`), else the detail under the worker."""
    times = [str(e["ts"]).replace("T", " ")[:19] for e in events]
    rows = [[t, e["worker"] or "(manager)", e["kind"], _detail_text(e["detail"])] for t, e in zip(times, events)]
    table = _table(None, ("time (UTC)", "worker", "event", "detail"), rows)
    if wide:
        return table
    stacked = [[t, kind, Text(worker, style="bold").append("\n" + detail, style="")] for t, worker, kind, detail in rows]
    return Fit(table, _table(None, ("time (UTC)", "event", "worker / detail"), stacked))


def report_dict(report) -> dict[str, Any]:
    """The run report as plain JSON-ready data (`run --output json`)."""
    return {
        "run_id": report.run_id, "mode": str(report.mode), "environment": str(report.environment),
        "shard": report.shard, "status": report.status, "elapsed_s": round(report.elapsed_s, 3),
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


def _when(t: datetime | None, *, seconds: bool = True) -> str:
    """A stored time in UTC; without `seconds` they are shown only when not zero (bars end on minutes)."""
    if t is None:
        return ""
    return f"{t:%Y-%m-%d %H:%M:%S}" if seconds or t.second or t.microsecond else f"{t:%Y-%m-%d %H:%M}"


def records_table(df: pl.DataFrame, kind: str, *, show_header: bool = True, wide: bool = False) -> Table:
    """Signals or rejections as read from the store; the mode is always a column.

    Narrow (fits 80 columns): bar time, client, strategy, symbol, timeframe, mode, then direction and
    confidence (signals) or the reasons (rejections). `wide` adds seconds, strength and weight, and
    the direction and confidence of rejections."""
    rejections = kind == "rejections"
    text = ("bar_time (UTC)", "client", "strategy", "symbol", "tf", "mode", *(("reasons",) if rejections else ()))
    nums = ("dir", "conf") if wide or not rejections else ()
    nums += ("strength", "weight") if wide and not rejections else ()
    rows = []
    for r in df.iter_rows(named=True):
        row = [_when(r["bar_time"], seconds=wide), r["client_id"], r["strategy_id"], r["symbol"], r["timeframe"],
               r["mode"]]
        if rejections:
            row.append(", ".join(r["reasons"] or ()))
        if nums:
            row += [f"{r['direction']:+d}" if r["direction"] else "0", f"{r['confidence']:.4f}"]
        if len(nums) > 2:
            row += [f"{r['strength']:.4f}", f"{r['weight']:.4f}"]
        rows.append(row)
    return _table(None, (*text, *nums), rows, numbers=nums, show_header=show_header)


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


def counts_table(df: pl.DataFrame, by: Sequence[str], total: dict[str, int], *, start: datetime | None,
                 end: datetime | None) -> Group:
    """`signals count`: which bars were counted, then one line per group and the total."""
    a, b = _when(start, seconds=False), _when(end, seconds=False)
    span = (f"bars ending in ({a}, {b}] UTC" if a and b else f"bars ending after {a} UTC" if a
            else f"bars ending at or before {b} UTC" if b else "every stored bar")
    rows = [[*(str(r[c]) for c in by), f"{r['signals']:,}", f"{r['rejections']:,}"] for r in df.iter_rows(named=True)]
    if len(rows) != 1:
        rows.append([*(["total"] + [""] * (len(by) - 1) if by else []),
                     f"{total['signals']:,}", f"{total['rejections']:,}"])
    nums = ("signals", "rejections")
    return Group(Text(span), _table(None, (*by, *nums), rows, numbers=nums))


RUN_LIST_COLUMNS = ("run_id", "mode", "environment", "status", "started_at", "elapsed_s", "bars", "signals",
                    "rejections")


def runs_table(df: pl.DataFrame, *, wide: bool = False, now: datetime | None = None) -> Table:
    """One line per run, newest first: its status, how long it ran (a run without a status: so far)
    and its counts. The run id holds its start time; `wide` adds the environment, the start time, the
    bad bars and bars/s."""
    rows = []
    for r in df.iter_rows(named=True):
        elapsed = r["elapsed_s"]
        if elapsed is None and r["status"] is None and r["started_at"] is not None and now is not None:
            elapsed = (now - r["started_at"]).total_seconds()
        counts = ("bars", "signals", "rejections", *(("bar_rejections",) if wide else ()))
        row = [r["run_id"], r["mode"], *((r["environment"],) if wide else ()), r["status"] or "running",
               *((_when(r["started_at"]),) if wide else ()), "" if elapsed is None else duration(elapsed),
               *("" if r[c] is None else f"{r[c]:,}" for c in counts)]
        if wide:
            row.append("" if r["bars_per_s"] is None else f"{r['bars_per_s']:,.0f}")
        rows.append(row)
    text = ("run", "mode", *(("environment",) if wide else ()), "status", *(("started (UTC)",) if wide else ()))
    nums = ("elapsed", "bars", "signals", "rejected", *(("bad bars", "bars/s") if wide else ()))
    return _table(f"{df.height} runs (newest first)", (*text, *nums), rows, numbers=nums)


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
                  else str(v) if k in ("seed", "pid") else f"{v:,}" if isinstance(v, int)
                  else f"{v:,.2f}" if isinstance(v, float) else str(v))
    if "config" in row:  # a store from before provenance was kept has no such column
        t.add_row("config", "not recorded" if config is None
                  else "recorded, secrets redacted (`--output json` shows it)")
    lines = [Text(f"  {k}={v:,}") for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])]
    shown = [Text(f"  {name}  {digest[:_DIGEST_SHOWN]}") for name, digest in files.items()]
    return Group(t, *([Text("data files (sha256)", style="bold")] + shown if shown else []),
                 *([Text("rejections by reason", style="bold")] + lines if lines else []))
