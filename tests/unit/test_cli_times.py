"""Times as an operator types them (`--start today`, `--since 2h`): one parser for every command."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from signalgen.cli.app import parse_time

NOW = datetime(2026, 3, 4, 15, 30, 12, tzinfo=UTC)


@pytest.mark.parametrize(("text", "want"), [
    ("2025-02-01", datetime(2025, 2, 1, tzinfo=UTC)),
    ("2025-02-01T12:30", datetime(2025, 2, 1, 12, 30, tzinfo=UTC)),
    ("2025-02-01 12:30:05", datetime(2025, 2, 1, 12, 30, 5, tzinfo=UTC)),
    ("2025-02-01T12:30:00Z", datetime(2025, 2, 1, 12, 30, tzinfo=UTC)),
    ("2025-02-01T12:30:00+01:00", datetime(2025, 2, 1, 11, 30, tzinfo=UTC)),
    ("now", NOW),
    ("today", datetime(2026, 3, 4, tzinfo=UTC)),
    ("Yesterday", datetime(2026, 3, 3, tzinfo=UTC)),
    ("30m", NOW - timedelta(minutes=30)),
    ("-2h", NOW - timedelta(hours=2)),
    ("7d", NOW - timedelta(days=7)),
    ("1w", NOW - timedelta(weeks=1)),
    ("90s", NOW - timedelta(seconds=90)),
])
def test_times_an_operator_types(text: str, want: datetime) -> None:
    got = parse_time(text, now=NOW)
    assert got == want and got.tzinfo is not None and got.utcoffset() == timedelta(0)


def test_today_is_the_utc_day() -> None:
    late = datetime(2026, 3, 4, 23, 30, tzinfo=timezone(timedelta(hours=-5))).astimezone(UTC)  # 04:30 on the 5th
    assert parse_time("today", now=late) == datetime(2026, 3, 5, tzinfo=UTC)


@pytest.mark.parametrize("text", ["tomorrow", "2h ago", "3y", "", "x" * 5000, "2025-13-01", "1e9h"])
def test_anything_else_is_refused_saying_what_is_accepted(text: str) -> None:
    with pytest.raises(ValueError, match="use ISO 8601") as e:
        parse_time(text, now=NOW)
    assert len(str(e.value)) < 200  # the input is echoed clipped
