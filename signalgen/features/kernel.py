"""The window arithmetic both feature paths share, so per-bar and batch values are bit-identical.

A window of w bars ending at bar t is summarised from power-of-two *nodes*: the node of size k at t
summarises bars t-k+1 .. t and is built from two nodes of size k/2 (at t-k/2 and at t). A window
merges the nodes of w's binary digits, newest first (w = 60: the 32 bars ending at t, then 16, 8
and 4 older ones). Each value is therefore a fixed tree of IEEE operations over the window's own
bars: it cannot depend on where a series, a chunk or a replay's history began. `batch.py` runs
this tree over whole arrays, `incremental.py` over one bar's ring buffers, with the same
`merge_pair` and merge order (`plan`), so both round identically. It costs O(log w) merges per bar
and window: ~40 per bar for the whole feature set, where a running sum would need ~10 but round
differently depending on where it started.

The one transcendental, log, is numpy's on both paths (a SIMD log may differ from libm's by an
ulp); the rest are +, -, *, /, sqrt and comparisons, which IEEE 754 rounds the same everywhere.

Two kinds of node:
- a float sum, for windows that only need a mean of values that are not far from zero relative to
  their spread (RSI gains/losses, ranges): merge adds;
- a (mean, mean_low, M2) triple, M2 the sum of squared deviations from the mean, for prices,
  volumes and returns: merge is Chan et al.'s pairwise update. The mean is kept as an unevaluated
  sum mean + mean_low (TwoSum), so the difference of two nodes' means is exact to ~eps of the
  spread, not of the price level: near-flat prices (moves of 2e-8 relative at 50,000) keep ~1e-10
  relative variance. A window of equal values x is exactly (x, 0, 0) (the spec's 0 / 0.5 / 1
  fallbacks).

Both work unchanged on floats and on numpy arrays (the operators are the same IEEE operations).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache
from typing import Any

NAN = math.nan
Node = Any  # float | (mean, mean_low, M2) of floats per bar; the same of arrays in batch


@cache
def parts(w: int) -> tuple[int, ...]:
    """Node sizes of a w-bar window, newest first: w's binary digits, largest first (60: 32, 16, 8, 4)."""
    return tuple(1 << b for b in range(w.bit_length() - 1, -1, -1) if w >> b & 1)


def levels(windows: tuple[int, ...]) -> tuple[int, ...]:
    """Node sizes to build for these windows: 1, 2, 4, ... up to the largest part."""
    top = max(p for w in windows for p in parts(w))
    return tuple(1 << b for b in range(top.bit_length()))


@cache
def plan(w: int) -> tuple[tuple[int, int, float, float], ...]:
    """How `window` merges the nodes of a w-bar window, after the newest: (size, offset, the two
    weights of `merge_pair`) per older node."""
    sizes, steps, n = parts(w), [], parts(w)[0]
    for size in sizes[1:]:
        steps.append((size, n, n / (size + n), size * n / (size + n)))
        n += size
    return tuple(steps)


def merge_pair(older: Node, newer: Node, new_share: float, cross: float) -> Node:
    """The (mean, mean_low, M2) node of two adjacent spans of n_old and n_new values (older first);
    new_share = n_new / n and cross = n_old * n_new / n. (A sum node merges by `+`.)"""
    (m_a, low_a, q_a), (m_b, low_b, q_b) = older, newer
    d = (m_b - m_a) + (low_b - low_a)  # nearby means subtract exactly (Sterbenz)
    step = d * new_share
    m = m_a + step  # TwoSum: m + err == m_a + step exactly
    back = m - m_a
    err = (m_a - (m - back)) + (step - back)
    return m, low_a + err, q_a + q_b + d * d * cross


def level_weights(k: int) -> tuple[float, float]:
    """`merge_pair`'s weights for two halves of a node of size k."""
    return 0.5, k / 4


def window(node: Callable[[int, int], Node], w: int, paired: bool) -> Node:
    """The node of the w bars ending at t; `node(size, offset)` is the node of `size` bars ending
    `offset` bars before t."""
    acc = node(parts(w)[0], 0)
    for size, offset, share, cross in plan(w):
        acc = merge_pair(node(size, offset), acc, share, cross) if paired else node(size, offset) + acc
    return acc


def mean(node: Node, w: int) -> Any:
    """Mean of a window's node."""
    return node[0] + node[1] if isinstance(node, tuple) else node / w


def variance(node: tuple, w: int) -> Any:
    """Sample variance (ddof=1) of a window's (mean, mean_low, M2) node."""
    return node[2] / (w - 1)
