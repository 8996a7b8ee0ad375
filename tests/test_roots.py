"""The guard of tests/conftest.py: a test that reads the working tree's clients/ fails; a root built
by tests.roots.copy_config reads none of it."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from signalgen.config.loader import load_config
from signalgen.errors import ConfigError
from tests import conftest
from tests.roots import REPO, copy_config
from tests.unit.config.helpers import make_registry


@pytest.mark.shipped_clients  # lets this test read them, so it can look at what the guard saw
def test_the_guard_sees_every_kind_of_read(monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = REPO / "clients"
    (shipped / "odum.yaml").read_text()
    sorted(shipped.glob("*.yaml"))
    monkeypatch.chdir(REPO)
    os.listdir("clients")  # relative to the repo, as a run without --root from the repo reads it
    assert conftest.reads == [str(shipped / "odum.yaml"), str(shipped), str(shipped)]


@pytest.mark.shipped_clients
def test_a_load_from_the_repo_is_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    with contextlib.suppress(ConfigError):  # whatever clients an operator keeps there
        load_config("local-dev", "mock")  # root "." is the repo: the working tree's clients
    assert any(Path(p).parent == REPO / "clients" for p in conftest.reads)


def test_a_copied_root_reads_none(tmp_path: Path) -> None:
    root = copy_config(tmp_path / "root")
    make_registry(root / "registry")
    cfg = load_config("local-dev", "mock", root=root)
    assert [c.id for c in cfg.clients] == ["ada", "christian", "ikenna", "odum"]
    assert conftest.reads == []
