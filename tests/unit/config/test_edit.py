"""`add-strategy`'s edit of a client file: only inside clients/, comments and layout kept."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from signalgen.config.edit import client_file, merge_strategies
from signalgen.errors import ConfigError

CLIENT = """\
# Client odum: one strategy.     (a comment the edit must keep)
id: odum
routing: internal             # signals go to the environment's stream
strategies:
  - id: momentum_v1
    symbols: [BTCUSD, SOLUSD]   # flow style kept
    timeframes: ['5m']
    models:
      - model_id: swing_high
        confidence_threshold: 0.6
"""
ADDED = """\
id: breakout_v1   # new
symbols: [ETHUSD]
timeframes: [5m]
models:
  - model_id: swing_low
    confidence_threshold: 0.7
"""


def test_an_added_strategy_keeps_every_comment_and_line_of_the_file() -> None:
    out = merge_strategies(CLIENT, ADDED, file="t")
    assert out.startswith(CLIENT)  # the file as it was, byte for byte, then the new strategy
    assert out[len(CLIENT):].startswith("  - id: breakout_v1 # new\n    symbols: [ETHUSD]\n")
    assert [s["id"] for s in yaml.safe_load(out)["strategies"]] == ["momentum_v1", "breakout_v1"]


def test_a_strategy_with_the_same_id_is_replaced_and_the_others_keep_their_comments() -> None:
    replacement = ADDED.replace("breakout_v1", "momentum_v1").replace("\n", "\n    ").rstrip()
    out = merge_strategies(CLIENT, f"strategies:\n  - {replacement}\n", file="t")
    doc = yaml.safe_load(out)
    assert [s["id"] for s in doc["strategies"]] == ["momentum_v1"]
    assert doc["strategies"][0]["symbols"] == ["ETHUSD"]
    assert out.startswith("# Client odum: one strategy.     (a comment the edit must keep)\nid: odum\n"
                          "routing: internal             # signals go to the environment's stream\n")


def test_a_layout_that_would_not_survive_is_refused_not_rewritten() -> None:
    odd = CLIENT.replace("routing: internal", "quantconnect:\n   upload: false\nrouting: internal")  # 3 spaces
    assert yaml.safe_load(odd)["quantconnect"] == {"upload": False}
    with pytest.raises(ConfigError, match="does not survive one unchanged"):
        merge_strategies(odd, ADDED, file="t")


@pytest.mark.parametrize("addition, problem", [
    ("[" * 100 + "]" * 100, "nested more than 32 levels"),
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, "
                                                          f"*{p}, *{p}, *{p}, *{p}]\n"
                                                          for p, c in zip("abcdef", "bcdefg")), "more than 100,000"),
    ("- just a string", "expected a strategy"),
])
def test_hostile_or_wrong_additions_are_refused_before_the_round_trip(addition: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        merge_strategies(CLIENT, addition, file="t")


@pytest.mark.parametrize("client", ["../../other/clients/odum", "/etc/passwd", "odum/../odum", "ODUM", "",
                                    "a" * 64, None, 7, "odum\n"])
def test_a_client_id_must_be_a_safe_name(tmp_path: Path, client) -> None:
    (tmp_path / "clients").mkdir()
    (tmp_path / "clients" / "odum.yaml").write_text(CLIENT)
    with pytest.raises(ConfigError, match="not a safe name"):
        client_file(tmp_path / "clients", client)


def test_a_symlink_out_of_clients_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "clients").mkdir()
    outside = tmp_path / "other.yaml"
    outside.write_text(CLIENT)
    (tmp_path / "clients" / "odum.yaml").symlink_to(outside)
    with pytest.raises(ConfigError, match="leads outside"):
        client_file(tmp_path / "clients", "odum")
