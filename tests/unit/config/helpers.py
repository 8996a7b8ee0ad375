"""Helpers: a copy of the demo configs with a fake model registry, so tests never need trained models."""

from __future__ import annotations

from pathlib import Path

from tests.roots import REPO, copy_config

__all__ = ["REPO", "copy_demo", "edit", "line_of", "make_registry"]
DEMO_MODELS = ("swing_high", "swing_low", "swing_high_short", "swing_low_short", "daily_high", "daily_low")


def make_registry(folder: Path, model_ids=DEMO_MODELS) -> None:
    """The registry layout the loader checks: <folder>/<model_id>/<version>/card.json."""
    for model_id in model_ids:
        version = folder / model_id / "1.0.0+deadbeef"
        version.mkdir(parents=True)
        (version / "card.json").write_text("{}")


def copy_demo(root: Path) -> Path:
    copy_config(root)
    make_registry(root / "registry")
    return root


def edit(path: Path, old: str, new: str) -> str:
    """Replace one exact snippet in a config file (it must be there); returns the new text."""
    text = path.read_text()
    assert text.count(old) >= 1, f"{old!r} not in {path}"
    text = text.replace(old, new, 1)
    path.write_text(text)
    return text


def line_of(text: str, needle: str) -> int:
    """1-based line of the first occurrence of `needle`."""
    return text[: text.index(needle)].count("\n") + 1
