"""The guard that keeps tests off the working tree's clients/ (tests/roots.py says why).

An audit hook notes every open, listing or copy of a path under <repo>/clients/ made in this process
(a root copied from there, a load_config run from the repo); a test that made one fails. A test
about the shipped client files themselves says so with `@pytest.mark.shipped_clients`.
"""

from __future__ import annotations

import os
import sys

import pytest

from tests.roots import REPO

_SHIPPED = str(REPO / "clients")
_EVENTS = {"open", "os.listdir", "os.scandir", "shutil.copytree", "shutil.copyfile"}
reads: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if event in _EVENTS and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.abspath(os.fsdecode(args[0]))
        if path == _SHIPPED or path.startswith(_SHIPPED + os.sep):
            reads.append(path)


sys.addaudithook(_audit)


@pytest.fixture(autouse=True)
def _no_working_tree_clients(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    # pytest empties the session's temporary folder on first use (rmtree opens each entry by its bare
    # name relative to a folder descriptor, a copied root's "clients" too): before the watch begins
    tmp_path_factory.getbasetemp()
    reads.clear()
    yield
    if reads and request.node.get_closest_marker("shipped_clients") is None:
        pytest.fail(f"the test read the working tree's clients/ ({reads[0]}); build a root with "
                    "tests.roots.copy_config (or mark a test of the shipped files `shipped_clients`)",
                    pytrace=False)


@pytest.fixture
def pg_dsn(monkeypatch) -> str:
    """A fresh PostgreSQL database of this test (dropped after it); SIGNALGEN_CONTROL_DSN names it."""
    from tests.postgres import fresh_database

    with fresh_database() as dsn:
        monkeypatch.setenv("SIGNALGEN_CONTROL_DSN", dsn)
        yield dsn
