import json
from datetime import timedelta

import pytest

from signalgen.errors import ConfigError
from signalgen.models.registry import ModelCard, ModelRegistry, sha256

from .helpers import T0, register_fake


def test_register_writes_layout_and_card(tmp_path):
    reg = ModelRegistry(tmp_path / "registry")
    card = register_fake(reg, payload=b"model bytes")
    folder = tmp_path / "registry" / "swing_high" / card.version
    assert sorted(p.name for p in folder.iterdir()) == ["card.json", "model.onnx", "model.txt"]
    assert card.content_hash == sha256(b"model bytes")
    assert card.version == card.content_hash[:12]
    assert card.files == {"model.txt": sha256(b"model bytes"), "model.onnx": sha256(b"onnx model bytes")}
    assert ModelCard.model_validate(json.loads((folder / "card.json").read_text())) == card
    assert reg.path("swing_high", card.version) == folder
    # no temporary folders left behind
    assert [p.name for p in (tmp_path / "registry" / "swing_high").iterdir()] == [card.version]


def test_same_bytes_same_version_and_card_kept(tmp_path):
    reg = ModelRegistry(tmp_path)
    first = register_fake(reg, payload=b"same")
    again = register_fake(reg, payload=b"same", created_at=T0 + timedelta(days=3))
    assert again == first  # the existing card, created_at included, is not rewritten
    assert reg.versions("swing_high") == [first.version]


def test_latest_is_newest_created_at(tmp_path):
    reg = ModelRegistry(tmp_path)
    new = register_fake(reg, payload=b"b", created_at=T0 + timedelta(days=1))
    old = register_fake(reg, payload=b"a", created_at=T0)
    register_fake(reg, "swing_low", payload=b"c", direction=-1)
    assert reg.ids() == ["swing_high", "swing_low"]
    assert reg.versions("swing_high") == [old.version, new.version]
    assert reg.card("swing_high") == new
    assert reg.card("swing_high", old.version) == old


def test_missing_model_is_config_error_naming_id_and_path(tmp_path):
    reg = ModelRegistry(tmp_path / "reg")
    register_fake(reg)
    with pytest.raises(ConfigError) as exc:
        reg.card("nope")
    assert "'nope'" in str(exc.value) and str(tmp_path / "reg") in str(exc.value)
    assert "swing_high" in str(exc.value)  # says what is there
    with pytest.raises(ConfigError, match="no version 'ffff'"):
        reg.card("swing_high", "ffff")


def test_empty_or_absent_registry(tmp_path):
    reg = ModelRegistry(tmp_path / "absent")
    assert reg.ids() == [] and reg.versions("x") == []
    with pytest.raises(ConfigError, match="absent"):
        reg.card("swing_high")


def test_corrupt_card_is_config_error_naming_file(tmp_path):
    reg = ModelRegistry(tmp_path)
    card = register_fake(reg)
    file = reg.path("swing_high", card.version) / "card.json"
    data = json.loads(file.read_text())
    data["unexpected"] = 1
    file.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as exc:
        reg.card("swing_high")
    assert exc.value.file == str(file)


def test_card_rejects_version_not_matching_hash(tmp_path):
    card = register_fake(ModelRegistry(tmp_path))
    with pytest.raises(ValueError, match="version"):
        ModelCard.model_validate({**card.model_dump(), "version": "0" * 12})
