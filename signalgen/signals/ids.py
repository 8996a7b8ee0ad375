"""Deterministic signal ids: the idempotency key of every store and output.

id = 128-bit hash of (client, strategy, symbol, timeframe, model versions) and the bar end time,
written as an RFC 9562 UUIDv8 (the version for application-defined hashes: 122 hash bits), so
stores keep it as a 16-byte UUID and every consumer sees the same canonical text.
The key part is hashed once with BLAKE2b; the per-bar part is mixed in with splitmix64, which is
vectorized in numpy, so millions of ids cost a fraction of a second and a single id costs the same
code path. Stable across processes, platforms and library versions (unlike `hash()` or polars' hash).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import polars as pl
import pyarrow as pa

_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
# two ASCII hex digits per byte value, so one gather turns 16 bytes into 32 characters
_HEX_PAIRS = np.frombuffer("".join(f"{b:02x}" for b in range(256)).encode(), dtype="<u2")
_GROUPS = ((0, 8), (9, 13), (14, 18), (19, 23), (24, 36))  # 8-4-4-4-12 around the dashes


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer (Steele et al.): a bijective avalanche on uint64."""
    z = (z ^ (z >> np.uint64(30))) * _C1
    z = (z ^ (z >> np.uint64(27))) * _C2
    return z ^ (z >> np.uint64(31))


def id_key(client_id: str, strategy_id: str, symbol: str, timeframe: str,
           model_versions: Sequence[tuple[str, str]]) -> tuple[int, int]:
    """The per-worker half of every id: two 64-bit words from BLAKE2b."""
    models = ",".join(f"{m}@{v}" for m, v in sorted(model_versions))
    digest = hashlib.blake2b(f"{client_id}|{strategy_id}|{symbol}|{timeframe}|{models}".encode(),
                             digest_size=16).digest()
    return int.from_bytes(digest[:8], "big"), int.from_bytes(digest[8:], "big")


def signal_ids(key: tuple[int, int], bar_time_us: np.ndarray) -> pl.Series:
    """Canonical UUID text (`xxxxxxxx-xxxx-8xxx-yxxx-xxxxxxxxxxxx`) for each bar end time (epoch us)."""
    t = np.ascontiguousarray(bar_time_us, dtype=np.int64).view(np.uint64)
    words = np.empty((t.size, 2), dtype=">u8")
    with np.errstate(over="ignore"):
        words[:, 0] = _mix64(np.uint64(key[0]) ^ _mix64(t))
        words[:, 1] = _mix64(np.uint64(key[1]) ^ _mix64(t + _GOLDEN))
    raw = words.view(np.uint8).reshape(t.size, 16)
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x80  # version 8
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # variant 10 (RFC 9562)
    digits = _HEX_PAIRS[raw].view(np.uint8)  # (n, 32)
    text = np.full((t.size, 36), ord("-"), dtype=np.uint8)
    at = 0
    for lo, hi in _GROUPS:
        text[:, lo:hi] = digits[:, at:at + hi - lo]
        at += hi - lo
    arrow = pa.FixedSizeBinaryArray.from_buffers(pa.binary(36), t.size, [None, pa.py_buffer(text.tobytes())])
    return pl.Series("signal_id", pl.from_arrow(arrow)).cast(pl.String)
