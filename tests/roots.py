"""Test roots: the repo's environments/ and modes/, with clients from tests/fixtures/clients.

Tests never read the working tree's clients/: operators add and edit clients there, as the docs
teach, and the suite must not change with them (tests/conftest.py fails a test that reads it).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLIENTS = REPO / "tests" / "fixtures" / "clients"
DEMO_CLIENTS = ("ada", "christian", "ikenna", "odum")


def copy_config(root: Path, clients: Sequence[str] = DEMO_CLIENTS) -> Path:
    """`root` holding the repo's environments/ and modes/ and the fixture `clients`; returns `root`."""
    for layer in ("environments", "modes"):
        shutil.copytree(REPO / layer, root / layer)
    (root / "clients").mkdir(parents=True)
    for client in clients:
        shutil.copy(CLIENTS / f"{client}.yaml", root / "clients")
    return root
