"""Model health: is a card fit to serve, and which outputs are unusable. Pure: time is an argument."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timedelta


from signalgen.models.registry import ModelCard


def check_card(card: ModelCard, *, now: datetime, max_age_days: int, feature_names: Sequence[str],
               timeframe: str | None = None) -> list[str]:
    """Problems that make `card` unfit to serve; empty when healthy.

    Args:
        card: the model's card.
        now: the current time (UTC), injected.
        max_age_days: oldest acceptable age of the model.
        feature_names: the names, in order, the caller will feed.
        timeframe: the bars' timeframe, when the caller knows it.
    """
    problems: list[str] = []
    label = f"{card.model_id} {card.version}"
    expected, actual = tuple(feature_names), tuple(card.feature_names)
    if actual != expected:
        missing = [n for n in expected if n not in actual]
        extra = [n for n in actual if n not in expected]
        if missing or extra:
            problems.append(f"{label}: feature schema mismatch: model lacks {missing or 'none'}, "
                            f"has extra {extra or 'none'}")
        else:
            first = next(i for i, (a, b) in enumerate(zip(actual, expected)) if a != b)
            problems.append(f"{label}: feature order mismatch at position {first}: "
                            f"model has {actual[first]!r}, caller feeds {expected[first]!r}")
    age = now - card.created_at
    if age > timedelta(days=max_age_days):
        problems.append(f"{label}: trained {age.days} days ago, older than max_age_days={max_age_days}")
    if age < timedelta(0):
        problems.append(f"{label}: created_at {card.created_at.isoformat()} is in the future")
    if timeframe is not None and timeframe != card.timeframe:
        problems.append(f"{label}: trained on {card.timeframe} bars, asked to serve {timeframe}")
    m = card.metrics
    if not all(math.isfinite(v) for v in (m.auc, m.log_loss, m.positive_rate, m.auc_train)):
        problems.append(f"{label}: non-finite validation metrics")
    elif m.auc < 0.5:
        problems.append(f"{label}: validation AUC {m.auc:.3f} is worse than chance")
    return problems
