"""constraints.txt pins what was tested: every package an install of signalgen[dev] pulls in has a
pin, and this test run uses exactly the pinned versions (README.md, "Pinned versions": how to refresh)."""

from __future__ import annotations

from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.roots import REPO

EXTRAS = ("dev", "redis", "gcp", "qc")


def pins() -> dict[str, str]:
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not name==version"
            out[canonicalize_name(name)] = version
    return out


def needed() -> set[str]:
    """Every distribution that signalgen with all its extras requires, transitively, on this platform."""
    seen: set[str] = set()
    todo = [("signalgen", EXTRAS)]
    while todo:
        name, extras = todo.pop()
        for text in metadata.requires(name) or []:
            req = Requirement(text)
            key = canonicalize_name(req.name)
            wanted = not req.marker or any(req.marker.evaluate({"extra": e}) for e in (*extras, ""))
            if wanted and key != "signalgen" and key not in seen:
                seen.add(key)
                todo.append((req.name, tuple(req.extras)))
    return seen


def test_every_required_package_is_pinned() -> None:
    assert sorted(needed() - set(pins())) == []


def test_the_tests_run_on_the_pinned_versions() -> None:
    installed = {name: metadata.version(name) for name in pins()}
    assert {n: (v, installed[n]) for n, v in pins().items() if installed[n] != v} == {}
