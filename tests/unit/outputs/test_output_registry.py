from __future__ import annotations

import subprocess
import sys

import pytest

from signalgen.errors import ConfigError
from signalgen.outputs import OUTPUTS, client_batch, output_class
from signalgen.outputs.base import Output
from tests.unit.outputs.factories import signal_frame


def _cfg(root, env: str = "local-integration"):
    from signalgen.config.loader import load_config
    from tests.roots import REPO, copy_config

    if not root.exists():
        copy_config(root, ("ikenna",))
        (root / "registry").symlink_to(REPO / "registry")  # the committed models: the loader checks ids
    return load_config(env, "historical", root=root)


def test_every_alias_names_an_output(tmp_path):
    made = {
        "quantconnect": output_class("quantconnect")(tmp_path, "ikenna", "historical"),
        "local": output_class("local")(tmp_path, "ikenna", "historical"),
        "memory": output_class("memory")("ikenna"),
        "redis": output_class("redis").from_config(_cfg(tmp_path / "root"), "ikenna"),  # connects on open()
        "pubsub": output_class("pubsub").from_config(_cfg(tmp_path / "root", "cloud-dev"), "ikenna"),  # ditto
    }
    assert set(made) == set(OUTPUTS)
    assert all(isinstance(o, Output) for o in made.values())


def test_unknown_alias_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown output .kafka.*local, memory, pubsub, quantconnect"):
        output_class("kafka")


def test_backends_are_imported_only_when_chosen():
    code = ("import sys, signalgen.outputs as o; "
            "print(sorted(m for m in sys.modules if m.startswith('signalgen.outputs.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_client_batch_checks_schema_and_tenant():
    df = signal_frame(3)
    assert client_batch(df.select(reversed(df.columns)), "ikenna").columns == df.columns
    with pytest.raises(ValueError, match="missing \\['period'\\]"):
        client_batch(df.drop("period"), "ikenna")
    with pytest.raises(ValueError, match="'zara'"):
        client_batch(df, "zara")
