"""Worker specs: each holds only its own strategy, and its config hash changes exactly when its config does."""

from __future__ import annotations

import pickle
from datetime import timedelta

from signalgen.config.loader import load_config
from signalgen.config.models import Routing, RunConfig
from signalgen.config.workers import worker_specs


def _hashes(cfg: RunConfig) -> dict[str, str]:
    return {s.id: s.config_hash for s in worker_specs(cfg)}


def _edit_strategy(cfg: RunConfig, client_id: str, strategy_id: str, **update) -> RunConfig:
    clients = [c.model_copy(update={"strategies": [s.model_copy(update=update) if (c.id, s.id) == (client_id, strategy_id)
                                                   else s for s in c.strategies]}) if c.id == client_id else c
               for c in cfg.clients]
    return cfg.model_copy(update={"clients": clients})


def test_a_spec_holds_only_its_own_strategy_symbol_and_timeframe(demo_root):
    specs = worker_specs(load_config("local-dev", "historical", root=demo_root))
    assert len({s.id for s in specs}) == len(specs) > 4
    for s in specs:
        assert s.client.strategies == [s.strategy]
        assert (s.strategy.symbols, s.strategy.timeframes) == ([s.symbol], [s.timeframe])
    assert pickle.loads(pickle.dumps(specs[0])).config_hash == specs[0].config_hash


def test_editing_one_strategy_changes_only_its_workers_hashes(demo_root):
    cfg = load_config("local-dev", "historical", root=demo_root)
    before = _hashes(cfg)
    strategy = next(s for s in cfg.client("ikenna").strategies if s.id == "swing_high_v1")
    models = [strategy.models[0].model_copy(update={"confidence_threshold": 0.61}), *strategy.models[1:]]
    after = _hashes(_edit_strategy(cfg, "ikenna", "swing_high_v1", models=models))
    changed = {w for w in before if before[w] != after[w]}
    assert changed and all(w.startswith("ikenna.swing_high_v1.") for w in changed)
    assert {w for w in before if w.startswith("ikenna.swing_high_v1.")} == changed
    assert any(w.startswith("ikenna.swing_low_v1.") for w in before)  # the client's other strategy kept its hash


def test_a_shared_setting_changes_every_hash_and_a_client_setting_all_of_that_client(demo_root):
    cfg = load_config("local-dev", "historical", root=demo_root)
    before = _hashes(cfg)
    for shared in ({"inference": "mock"}, {"seed": cfg.seed + 1}, {"backend": "lightgbm"}):
        after = _hashes(cfg.model_copy(update=shared))
        assert all(before[w] != after[w] for w in before), shared
    ikenna = cfg.client("ikenna").model_copy(update={"routing": Routing.INTERNAL})
    after = _hashes(cfg.model_copy(update={"clients": [ikenna if c.id == "ikenna" else c for c in cfg.clients]}))
    assert {w for w in before if before[w] != after[w]} == {w for w in before if w.startswith("ikenna.")}


def test_the_date_range_and_where_signals_go_do_not_change_a_hash(demo_root):
    cfg = load_config("local-dev", "historical", root=demo_root)
    moved = cfg.model_copy(update={"start": cfg.start - timedelta(days=3), "end": cfg.end + timedelta(days=1),
                                   "environment": cfg.environment.model_copy(
                                       update={"log_level": "DEBUG",
                                               "paths": cfg.environment.paths.model_copy(update={"output_dir": "x"})})})
    assert _hashes(moved) == _hashes(cfg)


def test_the_recovery_policy_is_the_managers_and_changes_no_hash(demo_root):
    cfg = load_config("local-dev", "historical", root=demo_root)
    strategy = next(s for s in cfg.client("ikenna").strategies if s.id == "swing_high_v1")
    policy = "pause" if strategy.recovery != "pause" else "stop"
    assert _hashes(_edit_strategy(cfg, "ikenna", "swing_high_v1", recovery=policy)) == _hashes(cfg)
