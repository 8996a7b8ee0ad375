"""Editing a client's YAML for `add-strategy`: inside `clients/` only, comments and layout kept.

The client id and the strategy text come from a command row (any program may write one), so the id
must pass the config's safe-name rule before a path is built from it, the path must resolve inside
`clients/` (no `..`, no absolute path, no symlink leading out), and the text is read within the
loader's limits before anything parses it for the edit. The edit is a ruamel.yaml round trip, which
keeps comments, key order and quoting; a file whose layout would not survive the round trip
byte for byte is refused rather than rewritten.
"""

from __future__ import annotations

import io
import itertools
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from signalgen.config.loader import parse_yaml
from signalgen.config.models import SAFE_ID
from signalgen.errors import ConfigError
from signalgen.logs import excerpt

# (mapping, sequence, offset) indents tried in turn: the first that reproduces the file is kept
_INDENTS = [(m, s, o) for m, s, o in itertools.product((2, 4), (2, 4), (0, 2)) if o <= s - 2]


def client_file(clients_dir: Path, client: Any) -> Path:
    """`clients_dir/<client>.yaml`, an existing file inside `clients_dir`; ConfigError otherwise."""
    if not isinstance(client, str) or not re.fullmatch(SAFE_ID, client):
        raise ConfigError(f"client id {excerpt(client, 60)} is not a safe name (lowercase letters, digits, "
                          "'_' and '-', at most 63)", field="client")
    base = clients_dir.resolve()
    path = clients_dir / f"{client}.yaml"
    if not path.is_file():
        raise ConfigError(f"no client {client!r}: {path} does not exist", field="client")
    if path.resolve().parent != base:
        raise ConfigError(f"{path} leads outside {clients_dir} (a symlink): not edited", field="client")
    return path


def _round_trip():
    try:
        from ruamel.yaml import YAML
    except ImportError as exc:  # a dependency; only a broken install lacks it
        raise ConfigError("add-strategy needs ruamel.yaml: pip install 'ruamel.yaml'") from exc
    return YAML


def merge_strategies(client_yaml: str, addition: str, *, file: str) -> str:
    """`client_yaml` with the strategies of `addition` added or replaced (by id), its comments and
    layout kept. `addition` is a YAML list of strategies, one strategy mapping (with `id`), or a
    mapping with a `strategies:` list. ConfigError when `addition` is not that, or when the client
    file's layout would not survive the edit."""
    if not isinstance(addition, str):
        raise ConfigError("expected the strategies as YAML text", file=file)
    parse_yaml(addition, file)  # within the loader's limits before the round trip parses it
    yaml_cls = _round_trip()
    for mapping, sequence, offset in _INDENTS:
        rt = yaml_cls()
        rt.preserve_quotes, rt.width = True, 4096
        rt.indent(mapping=mapping, sequence=sequence, offset=offset)
        client = rt.load(client_yaml)
        if _dump(rt, client) == client_yaml:
            break
    else:
        raise ConfigError("add-strategy edits a client file by a round trip that keeps comments and layout, "
                          "and this file's layout does not survive one unchanged: add the strategy by hand, "
                          "then `reload`", file=file)
    new = rt.load(addition)
    if isinstance(new, dict) and "strategies" in new:
        new = new["strategies"]
    elif isinstance(new, dict):
        new = [new]
    if not isinstance(new, list) or not new or not all(isinstance(s, dict) and s.get("id") for s in new):
        raise ConfigError("expected a strategy (a mapping with an id), a list of them, or `strategies:`",
                          file=file)
    strategies = client.get("strategies")
    if strategies is None:
        client["strategies"] = strategies = rt.seq()
    index = {s.get("id"): i for i, s in enumerate(strategies) if isinstance(s, dict)}
    for s in new:
        if s["id"] in index:
            strategies[index[s["id"]]] = s
        else:
            strategies.append(s)
    return _dump(rt, client)


def _dump(rt, data) -> str:
    out = io.StringIO()
    rt.dump(data, out)
    return out.getvalue()


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` by `text` at once (a temporary file beside it, renamed), keeping its mode."""
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o600
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
