"""The config loader: demo configs, layer precedence, and the messages bad configs produce."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from signalgen.config.loader import (
    LIVE_END,
    LIVE_START,
    Overrides,
    load_client,
    load_config,
    load_environment,
    load_mode,
    redacted,
    registry_model_ids,
)
from signalgen.config.loader import _line_of
from signalgen.config.models import Mode, timeframe_delta
from signalgen.errors import ConfigError

from .helpers import DEMO_MODELS, REPO, copy_demo, edit, line_of, make_registry

ENVS = ("local-dev", "local-integration", "cloud-dev")
MODES = ("historical", "mock", "simulation", "live")
UTC = timezone.utc


def fails(root: Path, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(root=root, **kwargs)
    assert info.value.exit_code == 2
    return info.value


# ---------------------------------------------------------------- demo configs


@pytest.mark.parametrize("env", ENVS)
@pytest.mark.parametrize("mode", MODES)
def test_demo_configs_load(demo_root: Path, env: str, mode: str) -> None:
    cfg = load_config(env, mode, root=demo_root)
    assert str(cfg.environment.name) == env and str(cfg.mode.name) == mode
    assert [c.id for c in cfg.clients] == ["ada", "christian", "ikenna", "odum"]
    assert cfg.start < cfg.end
    assert len(cfg.config_hash) == 64
    assert cfg.root == str(demo_root.resolve())
    assert set(cfg.files) == {"environment", "mode", "client:ada", "client:christian", "client:ikenna", "client:odum"}
    assert all(Path(p).is_file() for p in cfg.files.values())
    workers = [(c.id, s.id, sym, tf) for c in cfg.clients for s in c.strategies for sym in s.symbols
               for tf in s.timeframes]
    assert len(workers) == 12  # 9 on 5m bars + ada's daily demo: AAPL, MSFT, IBM on 1d
    assert {tf for *_, tf in workers} == {"5m", "1d"} and timeframe_delta("5m").total_seconds() == 300


def test_demo_clients_match_the_brief(demo_root: Path) -> None:
    cfg = load_config(root=demo_root)
    ikenna, odum, christian = cfg.client("ikenna"), cfg.client("odum"), cfg.client("christian")
    assert ikenna.routing == "quantconnect" and ikenna.accounts == {"binance": "ikenna-main"}
    assert ikenna.quantconnect.api_token_env == "IKENNA_QC_API_TOKEN"
    assert [s.id for s in ikenna.strategies] == ["swing_high_v1", "swing_low_v1"]
    high = ikenna.strategies[0]
    assert high.models[0].model_id == "swing_high" and high.models[0].confidence_threshold == 0.6
    assert high.models[0].lookback_window == 60
    vol = high.filters.volatility
    assert vol.enabled and (vol.min, vol.max) == (0.0005, 0.0035)
    momentum = odum.strategies[0]
    assert [m.model_id for m in momentum.models] == ["swing_high", "swing_low"]
    assert momentum.filters.trend_confirmation.enabled and momentum.sizing.method == "volatility_target"
    consensus, reversal = christian.strategies
    assert consensus.aggregation == "majority" and {m.model_id for m in consensus.models} == set(DEMO_MODELS[:4])
    assert reversal.aggregation == "unanimous" and christian.routing_for(reversal) == "internal"
    assert christian.routing_for(consensus) == "both"


@pytest.mark.shipped_clients
@pytest.mark.parametrize("client", ["ada", "christian", "ikenna", "odum"])
def test_every_shipped_client_names_its_redis_password_variable(client: str) -> None:
    # docs/streams.md: export the variable the client's YAML names, then `clients grant`
    assert load_client(REPO / "clients" / f"{client}.yaml").redis_password_env == f"{client.upper()}_REDIS_PASSWORD"


def test_demo_modes_and_environments(demo_root: Path) -> None:
    hist = load_mode("historical", root=demo_root)
    assert (hist.start, hist.end, hist.seed, hist.chunk_bars) == (
        datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 3, 1, tzinfo=UTC), 7, 50_000)
    assert load_mode("simulation", root=demo_root).replay_speed == 0
    live = load_config("local-dev", "live", root=demo_root)
    assert (live.start, live.end, live.data_source) == (LIVE_START, LIVE_END, "stream")
    cloud = load_environment("cloud-dev", root=demo_root)
    assert cloud.storage.type == "bigquery" and cloud.messaging.type == "pubsub"
    assert load_environment("local-integration", root=demo_root).messaging.url == "redis://127.0.0.1:6379/0"


def test_layers_load_by_path(demo_root: Path) -> None:
    env = load_environment(demo_root / "environments" / "cloud-dev.yaml")
    assert env.name == "cloud-dev"
    cfg = load_config(demo_root / "environments" / "cloud-dev.yaml", str(demo_root / "modes" / "mock.yaml"),
                      root=demo_root)
    assert cfg.mode.name == Mode.MOCK and cfg.environment.name == "cloud-dev"


def test_an_environment_file_anywhere_names_its_own_environment_and_folder(demo_root: Path, tmp_path: Path) -> None:
    path = tmp_path / "elsewhere" / "blue.yaml"
    path.parent.mkdir()
    path.write_text("name: blue\nstorage: {type: duckdb, path: var/blue/signalgen.duckdb}\n"
                    "messaging: {type: local, path: var/blue/stream}\n")
    cfg = load_config(path, "mock", root=demo_root)
    assert cfg.environment.name == "blue" and cfg.files["environment"] == str(path.resolve())
    # what the file leaves out lives in var/<name>/, never in a folder another environment shares
    assert (cfg.environment.control.path, cfg.environment.paths.output_dir) == ("var/blue/control.sqlite",
                                                                                "var/blue/out")
    assert cfg.environment_ref == str(path.resolve())  # what `reload` and supervisord load again
    assert load_config(cfg.environment_ref, "mock", root=demo_root) == cfg
    # a shipped environment is named, so generated commands stay `--env local-dev`
    assert load_config("local-dev", "mock", root=demo_root).environment_ref == "local-dev"
    assert load_config(demo_root / "environments/local-dev.yaml", "mock", root=demo_root).environment_ref == "local-dev"


@pytest.mark.parametrize("name", ["../../etc", "Blue", "a b", ""])
def test_an_environment_name_must_be_safe_before_any_path_is_built(demo_root: Path, tmp_path: Path,
                                                                  name: str) -> None:
    path = tmp_path / "env.yaml"
    path.write_text(f"name: {name!r}\nstorage: {{type: duckdb, path: x.duckdb}}\nmessaging: {{type: local, path: s}}\n")
    err = fails(demo_root, env=path)
    assert (err.file, err.line, err.field) == (str(path), 1, "name") and "lowercase letters" in str(err)
    if "/" not in name:  # given as a name, it is refused before environments/<name>.yaml is looked up
        assert "lowercase letters" in str(fails(demo_root, env=name))


def test_only_the_clients_asked_for(demo_root: Path) -> None:
    cfg = load_config(root=demo_root, clients=["odum", "ikenna"])
    assert [c.id for c in cfg.clients] == ["ikenna", "odum"]
    assert "client:christian" not in cfg.files


# ---------------------------------------------------------------- precedence


def test_data_source_environment_then_mode_then_override(demo_root: Path) -> None:
    # A preset that defers to the environment: each environment's market_data decides.
    (demo_root / "modes" / "deferring.yaml").write_text(
        "name: historical\ndata_source: environment\nstart: 2025-01-01\nend: 2025-01-02\n")
    deferring = demo_root / "modes" / "deferring.yaml"
    expected = {"local-dev": "synthetic", "local-integration": "files", "cloud-dev": "stream"}
    for env, source in expected.items():
        assert load_config(env, deferring, root=demo_root).data_source == source
    # The mode's own data_source beats the environment...
    assert load_config("local-integration", "simulation", root=demo_root).data_source == "synthetic"
    # ...and the command line beats both.
    cfg = load_config("local-dev", "simulation", root=demo_root, overrides=Overrides(data_source="files"))
    assert cfg.data_source == "files"


def test_range_seed_inference_backend_precedence(demo_root: Path) -> None:
    base = load_config("local-dev", "mock", root=demo_root)
    assert (base.start, base.end, base.seed) == (datetime(2025, 1, 1, tzinfo=UTC),
                                                 datetime(2025, 1, 8, tzinfo=UTC), 7)
    assert (base.inference, base.backend) == ("local", "onnx")
    edit(demo_root / "environments" / "local-dev.yaml", "ml_inference: local", "ml_inference: mock")
    assert load_config("local-dev", "mock", root=demo_root).inference == "mock"  # environment decides...
    ov = Overrides(start=datetime(2025, 1, 2), end=datetime(2025, 1, 3, tzinfo=UTC), seed=0,
                   inference="local", backend="lightgbm")
    cfg = load_config("local-dev", "mock", root=demo_root, overrides=ov)  # ...the command line wins
    assert (cfg.start, cfg.end, cfg.seed) == (datetime(2025, 1, 2, tzinfo=UTC),
                                              datetime(2025, 1, 3, tzinfo=UTC), 0)
    assert (cfg.inference, cfg.backend) == ("local", "lightgbm")


def test_strategy_override_keeps_only_those(demo_root: Path) -> None:
    cfg = load_config(root=demo_root, overrides=Overrides(strategies=("reversal_v1", "swing_low_v1")))
    assert [(c.id, [s.id for s in c.strategies]) for c in cfg.clients] == [
        ("christian", ["reversal_v1"]), ("ikenna", ["swing_low_v1"])]
    assert "client:odum" not in cfg.files
    err = fails(demo_root, overrides=Overrides(strategies=("swing_high_v1", "nope")))
    assert "'nope'" in str(err) and "known strategies: consensus_v1" in str(err) and err.field == "--strategy"


def test_bad_override_names_the_option(demo_root: Path) -> None:
    err = fails(demo_root, overrides=Overrides(backend="tensorflow"))
    assert err.field == "--backend" and "'tensorflow'" in str(err)
    err = fails(demo_root, overrides=Overrides(start=datetime(2025, 2, 1), end=datetime(2025, 1, 1)))
    assert "must be before end" in str(err)


def test_config_hash_ignores_location_but_not_content(demo_root: Path, tmp_path: Path) -> None:
    other = copy_demo(tmp_path / "elsewhere")
    a, b = load_config(root=demo_root), load_config(root=other)
    assert a.root != b.root and a.files != b.files
    assert a.config_hash == b.config_hash
    body = a.model_dump(mode="json", exclude={"files", "root", "config_hash"})
    assert a.config_hash == hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    edit(other / "clients" / "odum.yaml", "confidence_threshold: 0.6", "confidence_threshold: 0.61")
    assert load_config(root=other).config_hash != a.config_hash
    assert load_config(root=demo_root, overrides=Overrides(seed=8)).config_hash != a.config_hash


# ---------------------------------------------------------------- bad configs


def test_yaml_syntax_error_names_file_and_line(demo_root: Path) -> None:
    path = demo_root / "clients" / "ikenna.yaml"
    text = edit(path, "name: Ikenna", "name: Ikenna: the first")
    err = fails(demo_root)
    assert err.file == str(path) and err.line == line_of(text, "name: Ikenna")
    assert str(err).startswith(f"{path}:{err.line}: YAML syntax error: mapping values are not allowed")


def test_unknown_key_suggests_the_right_one(demo_root: Path) -> None:
    path = demo_root / "clients" / "odum.yaml"
    text = edit(path, "    aggregation: weighted", "    agregation: weighted")
    err = fails(demo_root)
    assert (err.file, err.line, err.field) == (str(path), line_of(text, "agregation"),
                                               "strategies.0.agregation")
    assert "unknown key 'agregation' (did you mean 'aggregation'?)" in str(err)


def test_wrong_type(demo_root: Path) -> None:
    path = demo_root / "clients" / "ikenna.yaml"
    text = edit(path, "lookback_window: 60 ", "lookback_window: sixty ")
    err = fails(demo_root)
    assert (err.line, err.field) == (line_of(text, "sixty"), "strategies.0.models.0.lookback_window")
    assert "valid integer" in str(err) and "(got 'sixty')" in str(err)


def test_threshold_above_one(demo_root: Path) -> None:
    path = demo_root / "clients" / "christian.yaml"
    text = edit(path, "model_id: swing_high_short\n        confidence_threshold: 0.45",
                "model_id: swing_high_short\n        confidence_threshold: 1.5")
    err = fails(demo_root)
    assert (err.file, err.line, err.field) == (
        str(path), line_of(text, "1.5"), "strategies.0.models.2.confidence_threshold")
    assert str(err) == (f"{path}:{err.line}: strategies.0.models.2.confidence_threshold: "
                        "Input should be less than or equal to 1 (got 1.5)")


def test_every_pydantic_error_of_a_file_is_listed_in_line_order(demo_root: Path) -> None:
    path = demo_root / "clients" / "ikenna.yaml"
    edit(path, "fraction: 0.1", "fraction: 2")  # first strategy, later in the file
    text = edit(path, "routing: quantconnect", "routing: email")
    lines = str(fails(demo_root)).splitlines()
    assert lines[0].startswith(f"{path}:{line_of(text, 'routing: email')}: routing: Input should be")
    assert lines[1].startswith(f"{path}:{line_of(text, 'fraction: 2')}: strategies.0.sizing.fraction: ")


def test_missing_key_points_at_its_parent(demo_root: Path) -> None:
    path = demo_root / "clients" / "odum.yaml"
    before = path.read_text()
    text = edit(path, "        confidence_threshold: 0.6\n", "")
    err = fails(demo_root)
    assert err.field == "strategies.0.models.0.confidence_threshold"
    assert err.line == line_of(text, "- model_id: swing_high") and "missing required key" in str(err)
    assert before != text


def test_model_not_in_registry(demo_root: Path) -> None:
    path = demo_root / "clients" / "christian.yaml"
    text = edit(path, "model_id: swing_low_short\n        confidence_threshold: 0.45",
                "model_id: swing_lowshort\n        confidence_threshold: 0.45")
    err = fails(demo_root)
    assert (err.file, err.line, err.field) == (str(path), line_of(text, "swing_lowshort"),
                                               "strategies.0.models.3.model_id")
    assert "did you mean 'swing_low_short'?" in str(err)
    assert "known models: daily_high, daily_low, swing_high, swing_high_short, swing_low, swing_low_short" in str(err)


def test_empty_registry_says_how_to_train(demo_root: Path) -> None:
    shutil.rmtree(demo_root / "registry")
    err = fails(demo_root)
    assert "python strategy_runner.py models train" in str(err) and err.field.endswith("model_id")
    (demo_root / "registry" / "swing_high" / "1.0.0").mkdir(parents=True)  # a version without a card
    assert registry_model_ids(demo_root / "registry") == []
    assert "models train" in str(fails(demo_root))


def test_registry_dir_comes_from_the_environment(demo_root: Path) -> None:
    edit(demo_root / "environments" / "local-dev.yaml", "registry_dir: registry", "registry_dir: other/reg")
    make_registry(demo_root / "other" / "reg", ["swing_high", "swing_low", "daily_high", "daily_low"])
    err = fails(demo_root)
    assert "swing_high_short" in str(err) and "known models: daily_high, daily_low, swing_high, swing_low" in str(err)


def test_duplicate_strategy_ids(demo_root: Path) -> None:
    path = demo_root / "clients" / "ikenna.yaml"
    text = edit(path, "  - id: swing_low_v1", "  - id: swing_high_v1")
    err = fails(demo_root)
    assert (err.file, err.field) == (str(path), "strategies.1.id")
    assert err.line == text.count("\n", 0, text.rindex("- id: swing_high_v1")) + 1
    assert "duplicate strategy id 'swing_high_v1'" in str(err)


@pytest.mark.parametrize("bad_id", ["../x", "a b", "*"])
def test_unsafe_client_id(demo_root: Path, bad_id: str) -> None:
    path = demo_root / "clients" / "odum.yaml"
    text = edit(path, "id: odum", f"id: {json.dumps(bad_id)}")
    err = fails(demo_root)
    assert (err.file, err.line, err.field) == (str(path), line_of(text, "id: "), "id")
    assert "lowercase letters, digits, '_' or '-'" in str(err) and repr(bad_id) in str(err)


@pytest.mark.parametrize("bad_id", ["../x", "a b", "*"])
def test_unsafe_client_id_on_the_command_line(demo_root: Path, bad_id: str) -> None:
    err = fails(demo_root, clients=[bad_id])
    assert "unknown client" in str(err) and "known clients: ada, christian, ikenna, odum" in str(err)


def test_client_id_must_match_file_name(demo_root: Path) -> None:
    path = demo_root / "clients" / "odum.yaml"
    text = edit(path, "id: odum", "id: odum2")
    err = fails(demo_root)
    assert (err.line, err.field) == (line_of(text, "id: odum2"), "id") and "file name 'odum'" in str(err)


def test_duplicate_yaml_keys(demo_root: Path) -> None:
    path = demo_root / "clients" / "odum.yaml"
    text = edit(path, "routing: internal", "routing: internal\nrouting: quantconnect")
    err = fails(demo_root)
    assert err.line == line_of(text, "routing: quantconnect")
    assert f"duplicate key 'routing' (first at line {line_of(text, 'routing: internal')})" in str(err)


@pytest.mark.parametrize("key", ["api_token", "password", "qc_api_key"])
def test_secret_value_in_yaml(demo_root: Path, key: str) -> None:
    path = demo_root / "clients" / "ikenna.yaml"
    text = edit(path, "  upload: false", f"  {key}: s3cr3t-value\n  upload: false")
    err = fails(demo_root)
    assert (err.line, err.field) == (line_of(text, f"{key}: s3cr3t"), f"quantconnect.{key}")
    assert f"put the value in an environment variable and name it with {key}_env" in str(err)
    assert "s3cr3t-value" not in str(err)


def test_secret_value_in_a_free_form_map_or_environment(demo_root: Path) -> None:
    # accounts is a free-form map, so extra=forbid alone would let this through.
    path = demo_root / "clients" / "ikenna.yaml"
    text = edit(path, "  binance: ikenna-main", "  binance: ikenna-main\n  binance_secret: s3cr3t-value")
    err = fails(demo_root)
    assert (err.file, err.line, err.field) == (str(path), line_of(text, "binance_secret"),
                                               "accounts.binance_secret")
    assert "s3cr3t-value" not in str(err)
    env = demo_root / "environments" / "local-integration.yaml"
    text = edit(env, "  # password_env: SIGNALGEN_REDIS_PASSWORD", "  password: hunter2")
    err = fails(demo_root, env="local-integration")
    assert (err.line, err.field) == (line_of(text, "password:"), "messaging.password")
    assert "name it with password_env" in str(err) and "hunter2" not in str(err)


def test_secret_in_an_env_field_is_not_echoed(demo_root: Path) -> None:
    edit(demo_root / "clients" / "ikenna.yaml", "api_token_env: IKENNA_QC_API_TOKEN",
         "api_token_env: tok-9f8e7d")
    err = fails(demo_root)
    assert err.field == "quantconnect.api_token_env" and "NAME of an environment variable" in str(err)
    assert "tok-9f8e7d" not in str(err)


def test_environment_errors_use_the_written_path(demo_root: Path) -> None:
    path = demo_root / "environments" / "local-dev.yaml"
    text = edit(path, "  path: var/local-dev/signalgen.duckdb", "  pth: var/local-dev/signalgen.duckdb")
    err = fails(demo_root)
    # pydantic says storage.duckdb.path; the file says storage.path.
    assert (err.file, err.field, err.line) == (str(path), "storage.path", line_of(text, "storage:"))
    second = f"{path}:{line_of(text, 'pth:')}: storage.pth: unknown key 'pth' (did you mean 'path'?)"
    assert second in str(err)


def test_layer_name_must_match_file(demo_root: Path) -> None:
    path = demo_root / "modes" / "mock.yaml"
    text = edit(path, "name: mock", "name: live")
    err = fails(demo_root, mode="mock")
    assert (err.file, err.line, err.field) == (str(path), line_of(text, "name: live"), "name")


def test_missing_files_are_errors_not_skipped(demo_root: Path) -> None:
    err = fails(demo_root, env="staging")
    assert err.file == str(demo_root / "environments" / "staging.yaml")
    assert "known: cloud-dev, local-dev, local-integration" in str(err)
    missing = demo_root / "nowhere" / "env.yaml"
    assert fails(demo_root, env=missing).file == str(missing)
    with pytest.raises(ConfigError, match="file not found"):
        load_client(demo_root / "clients" / "nobody.yaml")
    (demo_root / "clients" / "extra.yml").write_text("id: extra\n")
    assert "must end in .yaml" in str(fails(demo_root))


def test_empty_or_non_mapping_file(demo_root: Path) -> None:
    path = demo_root / "clients" / "odum.yaml"
    path.write_text("# nothing here\n")
    assert "file is empty" in str(fails(demo_root))
    path.write_text("- id: odum\n")
    assert "expected a mapping" in str(fails(demo_root))


def test_mode_without_range(demo_root: Path) -> None:
    path = demo_root / "modes" / "historical.yaml"
    text = path.read_text()
    path.write_text("\n".join(line for line in text.splitlines() if not line.startswith("start:")))
    err = fails(demo_root)
    assert (err.file, err.field) == (str(path), "start") and "--start/--end" in str(err)
    cfg = load_config(root=demo_root, overrides=Overrides(start=datetime(2025, 1, 1)))
    assert cfg.start == datetime(2025, 1, 1, tzinfo=UTC)


# ---------------------------------------------------------------- redaction


def test_redacted_names_variables_but_never_values(demo_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IKENNA_QC_API_TOKEN", "tok-SUPERSECRET-123")
    monkeypatch.delenv("IKENNA_QC_USER_ID", raising=False)
    shown = yaml.safe_dump(redacted(load_config(root=demo_root)))
    assert "tok-SUPERSECRET-123" not in shown
    assert "IKENNA_QC_API_TOKEN (set)" in shown and "IKENNA_QC_USER_ID (not set)" in shown
    json.dumps(redacted(load_config(root=demo_root)))  # JSON-able


def test_redacted_hides_url_passwords(demo_root: Path) -> None:
    edit(demo_root / "environments" / "local-integration.yaml", "url: redis://127.0.0.1:6379/0",
         "url: redis://app:hunter2@redis.internal:6379/0")
    shown = redacted(load_config("local-integration", root=demo_root))
    assert shown["environment"]["messaging"]["url"] == "redis://app:***@redis.internal:6379/0"
    assert "hunter2" not in json.dumps(shown)


# ---------------------------------------------------------------- line lookup


_keys = st.from_regex(r"[a-z]{1,5}", fullmatch=True)
_trees = st.recursive(st.integers(0, 9) | st.booleans(),
                      lambda inner: st.lists(inner, min_size=1, max_size=3)
                      | st.dictionaries(_keys, inner, min_size=1, max_size=3), max_leaves=12)


def _key_paths(data, path=()):
    if isinstance(data, dict):
        for k, v in data.items():
            yield (*path, k)
            yield from _key_paths(v, (*path, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _key_paths(v, (*path, i))


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(_keys, _trees, min_size=1, max_size=4), st.booleans())
def test_every_key_path_maps_to_the_line_of_its_key(data: dict, flow: bool) -> None:
    text = yaml.safe_dump(data, default_flow_style=None if flow else False, width=10_000)
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    lines = text.splitlines()
    for path in _key_paths(data):
        line = _line_of(node, path)
        assert re.search(rf"(^|[\s{{,-])'?{path[-1]}'?:", lines[line - 1]), (path, line, text)
