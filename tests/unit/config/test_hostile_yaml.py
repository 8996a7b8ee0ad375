"""Hostile config files, through the real CLI: each is refused with exit 2, quickly, naming the file,
in a bounded message. Before the reading limits these crashed with a traceback (exit 1) or ran for
minutes (billion laughs, 20,000 unknown keys)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import REPO, copy_demo

# Generous: the interpreter start alone is ~1 s on a busy CI machine. It catches hangs, not jitter.
WALL_S = 5.0
MAX_STDERR = 2_000


def _laughs(levels: int = 9) -> str:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


HOSTILE = {
    "recursive_alias": "strategies: &a [*a]\n",
    "billion_laughs": _laughs(),
    "control_byte": "id: ikenna\nname: bell\x07\n",
    "long_number": "id: ikenna\nmax_gross_exposure: " + "9" * 5_000 + "\n",
    "deep_nesting": "strategies: " + "[" * 1_000 + "]" * 1_000 + "\n",
    "shallow_but_too_deep": "strategies: " + "[" * 40 + "]" * 40 + "\n",
    "many_unknown_keys": "".join(f"k{i}: {i}\n" for i in range(20_000)),
    "huge_value": "id: ikenna\nname: " + "x" * (20 * 1024 * 1024) + "\n",
    "long_unknown_key": "id: ikenna\n" + "k" * 4_000 + ": 1\n",
    "impossible_date": "id: ikenna\nname: 2025-13-45\n",
}
# Where the hostile text goes: a client file, or the environment profile every run reads.
TARGETS = {"client": "clients/ikenna.yaml", "environment": "environments/local-dev.yaml"}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_yaml_exits_2_quickly_naming_the_file(tmp_path: Path, case: str, target: str) -> None:
    root = copy_demo(tmp_path / "demo")
    path = root / TARGETS[target]
    path.write_bytes(HOSTILE[case].encode())
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "strategy_runner.py", "config", "validate", "--root", str(root)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - started
    stderr = " ".join(proc.stderr.split())  # rich may wrap long lines
    assert proc.returncode == 2, proc.stderr[-MAX_STDERR:]
    assert "Traceback" not in proc.stderr
    assert str(path) in stderr
    assert len(proc.stderr) < MAX_STDERR, proc.stderr[:MAX_STDERR]
    assert "x" * 100 not in proc.stderr and "9" * 100 not in proc.stderr and "k" * 100 not in proc.stderr
    assert elapsed < WALL_S, f"{case}: {elapsed:.1f} s"
