"""preflight: the checks that need no model (models: tests/unit/models/test_faults.py)."""

from __future__ import annotations

from pathlib import Path

from signalgen.config.loader import Overrides, load_config
from signalgen.modes.preflight import data_problems, option_problems, path_problems, run_refusals

from .helpers import edit


def test_the_demo_config_has_no_refusals(demo_root: Path) -> None:
    cfg = load_config("local-dev", "historical", root=demo_root)
    assert run_refusals(cfg) == [] and data_problems(cfg) == [] and path_problems(cfg) == []
    assert option_problems(cfg) == []


def test_redis_messaging_is_accepted_in_local_integration(demo_root: Path) -> None:
    cfg = load_config("local-integration", "historical", root=demo_root)
    assert cfg.environment.messaging.type == "redis"
    assert run_refusals(cfg) == []


def test_messaging_without_a_backend_is_refused_only_when_a_strategy_routes_internal(demo_root: Path,
                                                                                     monkeypatch) -> None:
    from signalgen.outputs import OUTPUTS

    monkeypatch.delitem(OUTPUTS, "pubsub")  # a release without the Pub/Sub output
    cfg = load_config("cloud-dev", "historical", root=demo_root)
    [problem] = [p for p in run_refusals(cfg) if "messaging.type" in p]
    assert problem.startswith(f"{demo_root.resolve()}/environments/cloud-dev.yaml: messaging.type:")
    assert "messaging type 'pubsub' is not available in this release" in problem
    assert "christian.consensus_v1, christian.reversal_v1, odum.momentum_v1" in problem
    only_qc = load_config("cloud-dev", "historical", root=demo_root, clients=["ikenna"])
    assert [p for p in run_refusals(only_qc) if "messaging.type" in p] == []


def test_files_source_names_every_worker_without_a_file(demo_root: Path) -> None:
    folder = demo_root / "var" / "data" / "5m"
    folder.mkdir(parents=True)
    for symbol in ("BTCUSD", "ETHUSD"):
        (folder / f"{symbol}.csv").write_text("bar_time,open,high,low,close,volume\n")
    cfg = load_config("local-dev", "historical", root=demo_root, overrides=Overrides(data_source="files"))
    problems = data_problems(cfg)
    # ada trades daily bars and none were imported: its workers are named too, with the 1d folder.
    assert [p.split(":")[0] for p in problems] == [
        "worker ada.daily_swing_v1.AAPL.1d", "worker ada.daily_swing_v1.MSFT.1d",
        "worker ada.daily_swing_v1.IBM.1d",
        "worker christian.consensus_v1.XRPUSD.5m", "worker christian.reversal_v1.SOLUSD.5m",
        "worker odum.momentum_v1.SOLUSD.5m"]
    daily = demo_root / "var" / "data" / "1d"
    assert all(f"under {daily} " in p for p in problems[:3])
    assert all(f"under {folder} " in p for p in problems[3:])


def test_a_folder_that_cannot_be_created_is_named(demo_root: Path) -> None:
    (demo_root / "var").write_text("a file where the var/ folder should be")
    cfg = load_config("local-dev", "historical", root=demo_root)
    problems = path_problems(cfg)
    assert [p.split(": ")[1] for p in problems] == ["storage.path", "paths.output_dir", "messaging.path"]
    assert all(f"{demo_root / 'var'} is not a writable folder" in p for p in problems)


def test_quantconnect_upload_is_not_silently_ignored(demo_root: Path) -> None:
    edit(demo_root / "clients" / "ikenna.yaml", "upload: false", "upload: true")
    cfg = load_config("local-dev", "historical", root=demo_root)
    [problem] = option_problems(cfg)
    assert "ikenna.yaml: quantconnect.upload: upload to QuantConnect is not available" in problem
