"""--shard i/N: rendezvous hashing is deterministic, disjoint, covering, balanced, and moves few ids."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signalgen.config.loader import load_config
from signalgen.config.workers import worker_specs
from signalgen.errors import ConfigError
from signalgen.process.shard import parse_shard, shard_index, take_shard

from ..config.helpers import copy_demo

REPO = Path(__file__).resolve().parents[3]
ID_CHARS = st.characters(codec="utf-8", exclude_categories=("Cs",))
# 500 distinct worker ids (hypothesis varies them; the structure of real ids does not matter to a hash)
IDS = st.lists(st.text(ID_CHARS, min_size=1, max_size=40), min_size=500, max_size=500, unique=True)
SHARDS = st.integers(1, 16)


def tolerance(n: int, p: float) -> float:
    """Five standard deviations of binomial(n, p): a fair hash leaves it about once in 1.7 million tries."""
    return 5 * math.sqrt(n * p * (1 - p))


def realistic_ids(n: int = 500) -> list[str]:
    return [f"client{c}.strategy{s}.SYM{y}.5m" for c in range(10) for s in range(5) for y in range(n // 50)]


@given(IDS, SHARDS)
@settings(max_examples=40, deadline=None)
def test_disjoint_covering_and_balanced(ids: list[str], shards: int) -> None:
    parts = [take_shard([_Spec(i) for i in ids], k, shards) for k in range(shards)]
    owned = [s.id for part in parts for s in part]
    assert sorted(owned) == sorted(ids)  # covering, and disjoint (no id twice)
    mean = len(ids) / shards
    assert all(abs(len(part) - mean) <= tolerance(len(ids), 1 / shards) for part in parts), [len(p) for p in parts]


@given(IDS, st.integers(1, 15))
@settings(max_examples=40, deadline=None)
def test_growing_by_one_shard_moves_about_one_in_n_plus_1_only_to_the_new_shard(ids: list[str], shards: int) -> None:
    moved = [i for i in ids if shard_index(i, shards) != shard_index(i, shards + 1)]
    assert all(shard_index(i, shards + 1) == shards for i in moved)  # only to the new shard
    expected = len(ids) / (shards + 1)
    assert abs(len(moved) - expected) <= tolerance(len(ids), 1 / (shards + 1)), (len(moved), expected)


@given(st.text(ID_CHARS, min_size=1, max_size=80), SHARDS)
def test_deterministic_and_in_range(worker_id: str, shards: int) -> None:
    assert 0 <= shard_index(worker_id, shards) < shards
    assert shard_index(worker_id, shards) == shard_index(worker_id, shards)
    assert shard_index(worker_id, 1) == 0


def test_same_shards_in_another_process_with_another_hash_seed() -> None:
    ids = realistic_ids()
    code = ("import sys, json; from signalgen.process.shard import shard_index; "
            "print(json.dumps([shard_index(i, 7) for i in json.loads(sys.stdin.read())]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(ids), capture_output=True, text=True,
                         env=env, check=True, timeout=60).stdout
    assert json.loads(out) == [shard_index(i, 7) for i in ids]


def test_known_assignments_never_change() -> None:
    # pods of a running fleet rely on these: changing the hash reshuffles every worker
    symbols = ("BTCUSD", "ETHUSD", "SOLUSD", "XRPUSD", "ADAUSD", "DOTUSD", "LTCUSD", "BNBUSD")
    assert [shard_index(f"ikenna.swing_high_v1.{s}.5m", 4) for s in symbols] == [1, 1, 2, 1, 3, 2, 1, 3]


def test_realistic_fleet_of_500_is_balanced_for_2_to_16_shards() -> None:
    ids = realistic_ids()
    for shards in range(2, 17):
        counts = Counter(shard_index(i, shards) for i in ids)
        assert set(counts) == set(range(shards))
        assert max(abs(c - 500 / shards) for c in counts.values()) <= tolerance(500, 1 / shards), (shards, counts)


def test_take_shard_keeps_order_and_splits_the_demo_fleet(tmp_path: Path) -> None:
    specs = worker_specs(load_config("local-dev", "mock", root=copy_demo(tmp_path / "demo")))
    parts = [take_shard(specs, k, 3) for k in range(3)]
    assert sorted(s.id for p in parts for s in p) == sorted(s.id for s in specs)
    for part in parts:
        assert [s.id for s in part] == [s.id for s in specs if s in part]  # given order kept
    assert take_shard(specs, 0, 1) == specs


@pytest.mark.parametrize(("index", "shards"), [(-1, 3), (3, 3), (0, 0)])
def test_take_shard_refuses_an_index_outside_the_shards(index: int, shards: int) -> None:
    with pytest.raises(ValueError):
        take_shard([_Spec("a")], index, shards)


@pytest.mark.parametrize(("text", "expected"), [("0/1", (0, 1)), ("2/3", (2, 3)), (" 4 / 10 ", (4, 10))])
def test_parse_shard(text: str, expected: tuple[int, int]) -> None:
    assert parse_shard(text) == expected


@pytest.mark.parametrize(("text", "words"), [
    ("3/3", "the index must be below 3"), ("0/0", "N must be at least 1"), ("1", "expected i/N"),
    ("a/b", "expected i/N"), ("-1/3", "expected i/N"), ("1/2/3", "expected i/N"), ("", "expected i/N"),
    ("1.0/2", "expected i/N")])
def test_parse_shard_refuses_with_a_config_error(text: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_shard(text)
    assert info.value.exit_code == 2 and info.value.field == "--shard" and words in str(info.value)


class _Spec:
    """Stands for a WorkerSpec: take_shard needs only `.id`."""

    def __init__(self, id: str) -> None:
        self.id = id

