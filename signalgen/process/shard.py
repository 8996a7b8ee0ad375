"""Split a fleet of workers across N hosts or pods: `--shard i/N`, by rendezvous (highest random weight) hashing.

Each worker id scores every shard 0..N-1 with a stable hash and goes to the shard with the highest
score. Hence:
- deterministic on every machine and Python process (blake2b, never the salted built-in `hash`);
- disjoint and covering: each id has exactly one shard;
- balanced: each shard's count is binomial(n, 1/N) around n/N;
- minimal movement: a shard's score for an id does not depend on N, so going N -> N+1 moves an id
  only when the new shard N outscores the rest (about 1/(N+1) of the ids), and only to shard N.
  Going N+1 -> N moves only the ids of the removed shard.
No coordination and no state: a StatefulSet pod takes `--shard <ordinal>/<replicas>` and is done.
"""

from __future__ import annotations

import hashlib
import re
from typing import Protocol, TypeVar

from signalgen.errors import ConfigError

_SHARD = re.compile(r"^\s*(\d{1,6})\s*/\s*(\d{1,6})\s*$")


class _HasId(Protocol):
    @property
    def id(self) -> str: ...


S = TypeVar("S", bound=_HasId)


def _score(worker_id: str, shard: int) -> int:
    digest = hashlib.blake2b(f"{worker_id}\x00{shard}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def shard_index(worker_id: str, shards: int) -> int:
    """The shard (0..shards-1) that owns `worker_id`: the one with the highest score (ties: the lowest)."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    return max(range(shards), key=lambda s: (_score(worker_id, s), -s))


def take_shard(specs: list[S], index: int, shards: int) -> list[S]:
    """The specs shard `index` of `shards` owns, in their given order (WorkerSpec, or anything with `.id`)."""
    if not 0 <= index < shards:
        raise ValueError(f"shard {index}/{shards}: the index must be in 0..{shards - 1}")
    return [spec for spec in specs if shard_index(spec.id, shards) == index]


def parse_shard(text: str) -> tuple[int, int]:
    """"i/N" -> (i, N) with 0 <= i < N (e.g. "0/3"). ConfigError naming --shard on anything else."""
    m = _SHARD.match(text or "")
    if not m:
        raise ConfigError(f"expected i/N with 0 <= i < N, e.g. 0/3 (got {text[:40]!r})", field="--shard")
    index, shards = int(m.group(1)), int(m.group(2))
    if shards < 1 or index >= shards:
        raise ConfigError(f"expected i/N with 0 <= i < N, e.g. 0/3 (got {text.strip()!r}: "
                          f"{'N must be at least 1' if shards < 1 else f'the index must be below {shards}'})",
                          field="--shard")
    return index, shards
