"""The one config loader: YAML files -> a resolved, validated `RunConfig`.

Layers, in order (later wins where they overlap):

1. environment profile  `<root>/environments/<env>.yaml`   storage, messaging, dependencies, paths
2. mode preset          `<root>/modes/<mode>.yaml`         data source, date range, seed, replay speed
3. clients              `<root>/clients/*.yaml`            strategy channels (all files, or the ids asked for)
4. CLI overrides        `Overrides`                        start, end, seed, backend, inference, data source,
                                                           strategy selection

Resolution: data_source = override, else the mode's data_source unless it is "environment", else the
environment's `dependencies.market_data` (mock -> synthetic, files -> files, stream -> stream);
inference = override, else `dependencies.ml_inference`; backend = override, else "onnx";
start/end/seed = override, else the mode preset (the live preset may leave the range open).

Every problem is a `ConfigError` naming the file, the line and the dotted field path. A missing file
is an error, never skipped. Duplicate YAML keys are errors (YAML would silently keep the last one).

Config files are untrusted input, so reading one is bounded: at most `MAX_FILE_BYTES`, nesting at most
`MAX_DEPTH` levels, at most `MAX_NODES` values once aliases are expanded (a "billion laughs" document
is refused before it is built), no recursive aliases, scalars of at most `MAX_SCALAR_CHARS`, and only
the first `MAX_ERRORS` validation problems are reported. Messages never echo more than a few dozen
characters of what was written.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import NoneType, UnionType
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from signalgen.config.models import SAFE_ID, ClientConfig, EnvironmentConfig, Mode, ModePreset, RunConfig
from signalgen.errors import ConfigError

M = TypeVar("M", bound=BaseModel)

_MARKET_DATA_SOURCE = {"mock": "synthetic", "files": "files", "stream": "stream"}
# The live preset may have no range: these open bounds mean "whatever the stream delivers".
LIVE_START = datetime(1970, 1, 1, tzinfo=timezone.utc)
LIVE_END = datetime(9999, 12, 31, tzinfo=timezone.utc)
# Limits on one config file (see the module docstring). Real configs are a few KiB, 5 levels deep.
MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_NODES = 100_000
MAX_SCALAR_CHARS = 4096
MAX_ERRORS = 5
# Environment values are overridden by SIGNALGEN_<SECTION>__<KEY> variables (env_overrides).
ENV_PREFIX = "SIGNALGEN_"
ENV_DELIMITER = "__"
_SECRET_KEYS = ("api_key", "api_token", "password", "secret", "token")
_TRAIN_HINT = "run `python strategy_runner.py models train`"
# Friendlier words for the id patterns of signalgen.config.models.
_PATTERN_HELP = {
    SAFE_ID: "must be 1-63 characters of lowercase letters, digits, '_' or '-', starting with a letter or "
             "digit (it is used as a file, table and stream name)",
    r"^[A-Z0-9][A-Z0-9._-]{0,31}$": "must be 1-32 characters of uppercase letters, digits, '.', '_' or '-' "
                                    "(e.g. BTCUSD)",
    r"^[A-Z_][A-Z0-9_]{0,127}$": "must be the NAME of an environment variable (uppercase letters, digits "
                                "and '_', e.g. IKENNA_QC_API_TOKEN), never the secret itself",
}


@dataclass(frozen=True)
class Overrides:
    """Command-line values that win over every file. None / empty means "not given"."""

    start: datetime | None = None
    end: datetime | None = None
    seed: int | None = None
    backend: str | None = None
    inference: str | None = None
    data_source: str | None = None
    strategies: tuple[str, ...] = ()  # keep only these strategy ids (error if one matches nothing)


# ---------------------------------------------------------------- YAML with line numbers


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    pass


class _LimitError(yaml.MarkedYAMLError):
    """A document over one of the reading limits, or a value YAML cannot build; carries its position."""

    def __init__(self, problem: str, mark: yaml.Mark | None) -> None:
        super().__init__(problem=problem, problem_mark=mark)


def _clip(text: str, limit: int = 60) -> str:
    """`text` cut to `limit` characters: messages never carry unbounded input."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


# libyaml's parser (when PyYAML has it) reads a large file ~10x faster than the pure-Python one.
_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _StrictLoader(_BaseLoader):  # type: ignore[misc, valid-type]
    """SafeLoader that rejects duplicate mapping keys and values YAML cannot build (a 5,000-digit int)."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:  # int digit limit, impossible dates, ...
            raise _LimitError(f"unreadable value: {_clip(str(exc), 120)}", node.start_mark) from None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:
                continue  # unhashable key: SafeLoader reports it below
            if first != key_node.start_mark.line + 1:
                raise _DuplicateKeyError(None, None, f"duplicate key {_clip(repr(key))} (first at line {first}); "
                                         "YAML would silently keep only the last value", key_node.start_mark)
        return super().construct_mapping(node, deep)


def _measure(node: yaml.Node, open_: set[int], memo: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """(values, height) of `node` with aliases expanded; raises _LimitError over a limit.

    Aliases share node objects, so sizes are memoized by identity: the walk visits each written node
    once, however many times aliases repeat it. A node that contains itself is a recursive alias.
    """
    if id(node) in memo:
        size, height = memo[id(node)]
    elif id(node) in open_:
        raise _LimitError("recursive alias: a value contains itself", node.start_mark)
    elif isinstance(node, yaml.ScalarNode):
        if len(node.value) > MAX_SCALAR_CHARS:
            raise _LimitError(f"a value of {len(node.value):,} characters (limit {MAX_SCALAR_CHARS:,})",
                              node.start_mark)
        size, height = 1, 1
    else:
        open_.add(id(node))
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else node.value
        size, height = 1, 0
        for child in children:
            if len(open_) >= MAX_DEPTH:
                raise _LimitError(f"nested more than {MAX_DEPTH} levels deep (aliases included)",
                                  child.start_mark)
            child_size, child_height = _measure(child, open_, memo)
            size, height = size + child_size, max(height, child_height)
            if size > MAX_NODES:
                raise _LimitError(f"expands to more than {MAX_NODES:,} values (aliases repeat "
                                  "values); config files are far smaller", child.start_mark)
        open_.discard(id(node))
        size, height = size, height + 1
        memo[id(node)] = size, height
    if len(open_) + height > MAX_DEPTH:
        raise _LimitError(f"nested more than {MAX_DEPTH} levels deep (aliases included)", node.start_mark)
    return size, height


def _check_nesting(text: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH from the event stream (the parser is a loop, not a
    recursion), before the recursive composer could exhaust the stack."""
    depth = 0
    for event in yaml.parse(text, Loader=_BaseLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise _LimitError(f"nested more than {MAX_DEPTH} levels deep", event.start_mark)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise ConfigError("file not found" if not path.exists() else "not a file", file=str(path))
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            raise ConfigError(f"file is larger than {MAX_FILE_BYTES // 1024} KiB; config files are a few KiB",
                              file=str(path))
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (byte {exc.start})", file=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", file=str(path)) from None


def _read_yaml(path: Path) -> tuple[Any, yaml.Node | None]:
    """Parse one file into (data, node tree); the node tree gives line numbers for messages."""
    data, node = parse_yaml(_read_text(path), path)
    if data is None:
        raise ConfigError("file is empty; expected a mapping of keys", file=str(path))
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of keys at the top level, got a {type(data).__name__}",
                          file=str(path), line=node.start_mark.line + 1)
    return data, node


def parse_yaml(text: str, path: Path | str) -> tuple[Any, yaml.Node | None]:
    """YAML text from `path` (named in errors) into (data, its node tree), within the limits of this
    module's docstring; ConfigError otherwise."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise ConfigError(f"larger than {MAX_FILE_BYTES // 1024} KiB; config files are a few KiB", file=str(path))
    loader = None
    try:
        _check_nesting(text)
        loader = _StrictLoader(text)
        node = loader.get_single_node()
        if node is not None:
            _measure(node, set(), {})
        data = loader.construct_document(node) if node is not None else None
    except _DuplicateKeyError as exc:
        raise ConfigError(exc.problem, file=str(path), line=exc.problem_mark.line + 1) from None
    except yaml.reader.ReaderError as exc:
        bad = yaml.reader.Reader.NON_PRINTABLE.search(text)  # libyaml reports a byte offset: find the line
        raise ConfigError(f"YAML error: character #x{exc.character:02x} is not allowed "
                          "(control characters cannot appear in YAML)", file=str(path),
                          line=text.count("\n", 0, bad.start()) + 1 if bad else None) from None
    except _LimitError as exc:
        raise ConfigError(f"refused: {exc.problem}", file=str(path), line=exc.problem_mark.line + 1) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        # Only problem/context words and the position: the offending line might hold a secret.
        what = _clip("; ".join(p for p in (exc.context, exc.problem) if p), 200)
        col = f" (column {mark.column + 1})" if mark else ""
        raise ConfigError(f"YAML syntax error: {what}{col}", file=str(path),
                          line=mark.line + 1 if mark else None) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"YAML error: {_clip(str(exc), 200)}", file=str(path)) from None
    except RecursionError:  # a last resort: the limits above should stop every deep document first
        raise ConfigError(f"nested too deeply (limit {MAX_DEPTH} levels)", file=str(path)) from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, node


def _line_of(node: yaml.Node | None, loc: Sequence[str | int],
             index: dict[int, dict[Any, tuple[yaml.Node, yaml.Node]]] | None = None) -> int | None:
    """Line (1-based) of the deepest key along `loc` that exists in the YAML node tree.

    `index` caches each mapping's keys (pass one dict for many lookups in the same tree): without
    it each lookup scans the mapping, and 20,000 unknown keys would take 20,000² steps.
    """
    if node is None:
        return None
    index = {} if index is None else index
    line = node.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            keys = index.get(id(node))
            if keys is None:
                keys = index[id(node)] = {}
                for k, v in node.value:
                    if isinstance(k, yaml.ScalarNode):
                        keys.setdefault(k.value, (k, v))
            match = keys.get(part)
            if match is None:
                tag = keys.get("type")
                if tag is not None and isinstance(tag[1], yaml.ScalarNode) and tag[1].value == part:
                    continue  # pydantic puts the union tag in the path; it is not a YAML key
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


# ---------------------------------------------------------------- pydantic errors -> ConfigError


def _display_loc(data: Any, loc: Sequence[str | int]) -> list[str | int]:
    """The loc as written in the file: without union tags (`storage.duckdb.path` -> `storage.path`)."""
    out: list[str | int] = []
    for part in loc:
        if isinstance(data, dict) and part not in data and data.get("type") == part:
            continue
        out.append(part)
        data = data.get(part) if isinstance(data, dict) else (
            data[part] if isinstance(data, list) and isinstance(part, int) and part < len(data) else None)
    return out


def _strip(tp: Any) -> Any:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if get_origin(tp) in (Union, UnionType):
        args = [a for a in get_args(tp) if a is not NoneType]
        if len(args) == 1:
            return _strip(args[0])
    return tp


def _model_at(model: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The pydantic model class that `loc` points into, for listing its allowed keys."""
    tp: Any = model
    for part in loc:
        tp = _strip(tp)
        if isinstance(part, int):
            tp = get_args(tp)[0] if get_origin(tp) is list else None
        elif isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(part)
            tp = field.annotation if field else None
        else:  # a discriminated union: the loc names the tag
            tp = next((m for m in get_args(tp) if isinstance(m, type) and issubclass(m, BaseModel)
                       and "type" in m.model_fields
                       and part in get_args(m.model_fields["type"].annotation)), None)
        if tp is None:
            return None
    tp = _strip(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _got(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return ""
    return f" (got {_clip(repr(value))})"


def _message(err: dict, model: type[BaseModel], loc: Sequence[str | int]) -> str:
    kind, key = err["type"], str(loc[-1]) if loc else ""
    name = key if loc and isinstance(loc[-1], str) else "value"
    if kind == "extra_forbidden":
        msg = f"unknown key {_clip(repr(key))}"
        parent = _model_at(model, err["loc"][:-1])
        if parent is not None:
            allowed = list(parent.model_fields)
            close = difflib.get_close_matches(key, allowed, n=1)
            msg += f" (did you mean {close[0]!r}?)" if close else f" (allowed: {', '.join(allowed)})"
        return msg
    if kind == "missing":
        return f"missing required key {key!r}"
    if kind == "string_pattern_mismatch":
        msg = f"{name} {_PATTERN_HELP.get(err['ctx']['pattern'], 'has an invalid format')}"
    elif kind == "value_error":
        msg = str(err["ctx"]["error"])
    else:
        msg = err["msg"]
    # Never echo what was written in an *_env field: a misplaced secret would end up in logs.
    return msg if key.endswith("_env") else msg + _got(err.get("input"))


def _reject_secrets(data: Any, node: yaml.Node | None, path: Path, loc: tuple = ()) -> None:
    """Refuse keys that look like secret values anywhere in a file (even in free-form maps like accounts)."""
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        if isinstance(key, str) and key.lower().endswith(_SECRET_KEYS):
            field = _clip(".".join(map(str, (*loc, key))), 120)
            raise ConfigError(f"key {_clip(repr(key))} looks like a secret value; secrets never go in YAML: "
                              f"put the value in an environment variable and name it with {_clip(key)}_env",
                              file=str(path), line=_line_of(node, (*loc, key)), field=field)
        _reject_secrets(value, node, path, (*loc, key))


def _validate(model: type[M], data: dict, node: yaml.Node | None, path: Path, overrides: dict | None = None) -> M:
    """Validate one file's data, with `overrides` (from environment variables) merged over it; every
    pydantic error becomes a line naming the file, line and dotted path, or the variable that set it."""
    _reject_secrets(data, node, path)
    if overrides:
        data = _merged(data, overrides)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
    # Lines for every error (cheap with the index), words only for the first few, in file order.
    index: dict = {}
    lines = [_line_of(node, err["loc"], index) or 0 for err in errors]
    first = sorted(range(len(errors)), key=lambda i: lines[i])[:MAX_ERRORS]
    problems = []
    for i in first:
        loc = _display_loc(data, errors[i]["loc"])
        names = _variables(overrides or {}, loc)
        where = (", ".join(names), None) if names else (str(path), lines[i] or None)
        problems.append((*where, _clip(".".join(map(str, loc)), 120) or None,
                         _clip(_message(errors[i], model, errors[i]["loc"]), 300)))
    (file, line, field, msg), rest = problems[0], problems[1:]
    for other in rest:
        msg += f"\n{ConfigError(other[3], file=other[0], line=other[1], field=other[2])}"
    if len(errors) > MAX_ERRORS:
        msg += f"\n{path}: ... and {len(errors) - MAX_ERRORS:,} more problems"
    raise ConfigError(msg, file=file, line=line, field=field) from None


# ---------------------------------------------------------------- environment variables


def _merged(base: dict, over: dict) -> dict:
    """`base` with `over` merged in, key by key down nested mappings (a mapping replaces a scalar)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def env_overrides() -> dict:
    """The environment values set by `SIGNALGEN_<SECTION>__<KEY>` variables, as a nested mapping.

    pydantic-settings reads them: names are case-insensitive, `__` goes one level down, and a whole
    section may be given as JSON (`SIGNALGEN_PROCESS='{"nice": 5}'`). Values stay as written; the
    environment's models validate them after they are merged over the YAML, exactly like YAML values.
    A variable whose section is not an environment key is an error (a typo never falls back to the
    file), and so is SIGNALGEN_NAME: an environment's name is its file's (`--env PATH` for another).
    """
    if not any(var.upper().startswith(ENV_PREFIX) for var in os.environ):
        return {}
    from pydantic_settings import EnvSettingsSource, SettingsError

    fields = EnvironmentConfig.model_fields
    for var in os.environ:
        head = var.upper()
        if not head.startswith(ENV_PREFIX) or ENV_DELIMITER not in head[len(ENV_PREFIX):]:
            continue
        section = head[len(ENV_PREFIX):].split(ENV_DELIMITER, 1)[0].lower()
        if section not in fields:
            close = difflib.get_close_matches(section, list(fields), n=1)
            raise ConfigError(f"no environment section {_clip(section)!r}"
                              + (f" (did you mean {ENV_PREFIX}{close[0].upper()}{ENV_DELIMITER}...?)" if close else
                                 f"; sections: {', '.join(fields)}"), file=_clip(var))
    try:
        found = EnvSettingsSource(EnvironmentConfig, case_sensitive=False, env_prefix=ENV_PREFIX,  # type: ignore[arg-type]
                                  env_nested_delimiter=ENV_DELIMITER)()
    except SettingsError as exc:  # a section given as JSON that does not parse
        section = re.search(r'field "(\w+)"', str(exc))
        raise ConfigError("not a JSON object (a whole section is given as JSON, one key as "
                          f"{ENV_PREFIX}<SECTION>{ENV_DELIMITER}<KEY>)",
                          file=_variable((section.group(1),)) if section else None) from None
    if "name" in found:
        raise ConfigError("an environment's name comes from its file and cannot be overridden; pass "
                          "--env PATH to an environment file with its own name", file=f"{ENV_PREFIX}NAME")
    return found


def _variable(loc: Sequence[str | int]) -> str:
    return ENV_PREFIX + ENV_DELIMITER.join(map(str, loc)).upper()


def _leaves(node: dict, loc: tuple = ()) -> list[tuple]:
    out: list[tuple] = []
    for key, value in node.items():
        out += _leaves(value, (*loc, key)) if isinstance(value, dict) else [(*loc, key)]
    return out


def _variables(overrides: dict, loc: Sequence[str | int]) -> list[str]:
    """The variables that set `loc` or something inside it (an error on a section names each override in it)."""
    node: Any = overrides
    for i, part in enumerate(loc):
        if not isinstance(node, dict) or part not in node:
            return []
        if any(var.upper() == _variable(loc[: i + 1]) for var in os.environ):
            return [_variable(loc[: i + 1])]  # the leaf's own variable, or a section's JSON one
        node = node[part]
    return sorted(_variable((*loc, *leaf)) for leaf in _leaves(node)) if isinstance(node, dict) else []


# ---------------------------------------------------------------- layers


def _resolve(kind: str, value: str | Path, root: Path) -> tuple[Path, str | None]:
    """A layer given as a name (-> <root>/<kind>/<name>.yaml) or as a path; returns (path, name or None).

    A name must be a safe id before a path is built from it."""
    text = str(value)
    if isinstance(value, Path) or "/" in text or os.sep in text or text.endswith((".yaml", ".yml")):
        return Path(value), None
    if not re.match(SAFE_ID, text):
        raise ConfigError(f"{kind.rstrip('s')} name {_clip(repr(text))} {_PATTERN_HELP[SAFE_ID]}; or give a "
                          "path to a YAML file")
    path = root / kind / f"{text}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (root / kind).glob("*.yaml"))
        raise ConfigError(f"no {kind.rstrip('s')} named {text!r}; known: {', '.join(known) or 'none'}",
                          file=str(path))
    return path, text


def _check_name(cfg: EnvironmentConfig | ModePreset, name: str | None, node: yaml.Node | None,
                path: Path) -> None:
    if name is not None and str(cfg.name) != name:
        raise ConfigError(f"name {str(cfg.name)!r} does not match the file name {name!r}",
                          file=str(path), line=_line_of(node, ["name"]), field="name")


def _at_home(env: EnvironmentConfig, data: dict) -> EnvironmentConfig:
    """The control store and outputs, when neither the file nor a variable places them, go to the
    environment's own folder var/<name>/ (the name is a safe id: it cannot climb out of var/)."""
    home, update = f"var/{env.name}", {}
    if "path" not in (data.get("control") or {}):
        update["control"] = env.control.model_copy(update={"path": f"{home}/control.sqlite"})
    if "output_dir" not in (data.get("paths") or {}):
        update["paths"] = env.paths.model_copy(update={"output_dir": f"{home}/out"})
    return env.model_copy(update=update) if update else env


def _load_layer(kind: str, model: type[M], ref: str | Path, root: Path | str,
                overrides: dict | None = None) -> tuple[M, dict, Path]:
    path, name = _resolve(kind, ref, Path(root))
    data, node = _read_yaml(path)
    cfg = _validate(model, data, node, path, overrides)
    _check_name(cfg, name, node, path)
    return cfg, data, path


def _load_environment(env: str | Path, root: Path | str) -> tuple[EnvironmentConfig, Path, dict[str, str]]:
    """(environment, its file, dotted key -> the variable that set it)."""
    overrides = env_overrides()
    cfg, data, path = _load_layer("environments", EnvironmentConfig, env, root, overrides)
    sources = {".".join(loc): _variables(overrides, loc)[0] for loc in _leaves(overrides)}
    return _at_home(cfg, _merged(data, overrides)), path, sources


def load_environment(env: str | Path, *, root: Path | str = ".") -> EnvironmentConfig:
    """Load an environment profile by name (`<root>/environments/<env>.yaml`) or path, with the
    `SIGNALGEN_<SECTION>__<KEY>` variables set over it (see `env_overrides`)."""
    return _load_environment(env, root)[0]


def load_mode(mode: str | Path, *, root: Path | str = ".") -> ModePreset:
    """Load a mode preset by name (`<root>/modes/<mode>.yaml`) or path."""
    return _load_layer("modes", ModePreset, mode, root)[0]


def _load_client(path: Path) -> tuple[ClientConfig, yaml.Node | None]:
    data, node = _read_yaml(path)
    strategies = data.get("strategies")
    if isinstance(strategies, list):
        # Checked before pydantic so the message can point at the second definition.
        first: dict[Any, int] = {}
        for i, s in enumerate(strategies):
            sid = s.get("id") if isinstance(s, dict) else None
            if isinstance(sid, str) and sid in first:
                raise ConfigError(f"duplicate strategy id {_clip(repr(sid))} (also strategies.{first[sid]}); "
                                  "strategy ids must be unique within a client",
                                  file=str(path), line=_line_of(node, ["strategies", i, "id"]),
                                  field=f"strategies.{i}.id")
            if isinstance(sid, str):
                first[sid] = i
    cfg = _validate(ClientConfig, data, node, path)
    if cfg.id != path.stem:
        raise ConfigError(f"client id {cfg.id!r} must equal the file name {path.stem!r}",
                          file=str(path), line=_line_of(node, ["id"]), field="id")
    return cfg, node


def load_client(path: Path) -> ClientConfig:
    """Load and validate one client file (model ids are checked by `load_config`)."""
    return _load_client(Path(path))[0]


def _client_paths(root: Path, ids: Sequence[str] | None) -> list[Path]:
    folder = root / "clients"
    if not folder.is_dir():
        raise ConfigError("clients folder not found", file=str(folder))
    stray = sorted(folder.glob("*.yml"))
    if stray:
        raise ConfigError("client files must end in .yaml (this one would be ignored)", file=str(stray[0]))
    known = {p.stem: p for p in sorted(folder.glob("*.yaml"))}
    if not known:
        raise ConfigError("no client files (*.yaml) found", file=str(folder))
    if not ids:
        return list(known.values())
    unknown = sorted(set(ids) - set(known))
    if unknown:
        raise ConfigError(f"unknown client {', '.join(map(repr, unknown))}; known clients: "
                          f"{', '.join(known)}", file=str(folder))
    return [known[i] for i in sorted(set(ids))]


def registry_model_ids(registry_dir: Path) -> list[str]:
    """Model ids present in a registry: `<registry_dir>/<model_id>/<version>/card.json` exists."""
    if not registry_dir.is_dir():
        return []
    return sorted(p.name for p in registry_dir.iterdir() if p.is_dir() and any(p.glob("*/card.json")))


def _check_models(client: ClientConfig, node: yaml.Node | None, path: Path, registry_dir: Path,
                  known: list[str]) -> None:
    for i, strategy in enumerate(client.strategies):
        for j, ref in enumerate(strategy.models):
            if ref.model_id in known:
                continue
            if not known:
                hint = f"the registry is empty or missing: {_TRAIN_HINT}"
            else:
                close = difflib.get_close_matches(ref.model_id, known, n=1)
                hint = (f"did you mean {close[0]!r}? " if close else "") + f"known models: {', '.join(known)}"
            loc = ["strategies", i, "models", j, "model_id"]
            raise ConfigError(f"model {ref.model_id!r} is not in the model registry {registry_dir}/ ({hint})",
                              file=str(path), line=_line_of(node, loc), field=".".join(map(str, loc)))


def _select_strategies(clients: list[ClientConfig], wanted: tuple[str, ...]) -> list[ClientConfig]:
    known = sorted({s.id for c in clients for s in c.strategies})
    missing = sorted(set(wanted) - set(known))
    if missing:
        raise ConfigError(f"no strategy {', '.join(map(repr, missing))} in the selected clients; "
                          f"known strategies: {', '.join(known)}", field="--strategy")
    kept = []
    for c in clients:
        strategies = [s for s in c.strategies if s.id in wanted]
        if strategies:
            kept.append(c.model_copy(update={"strategies": strategies}))
    return kept


def config_hash(cfg: RunConfig) -> str:
    """sha256 of the canonical JSON of the resolved config, without `files`, `root` and the hash itself
    (nor `overrides`, which is not dumped: a value set by a variable hashes as if the file held it)."""
    body = cfg.model_dump(mode="json", exclude={"files", "root", "config_hash"})
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def load_config(env: str | Path = "local-dev", mode: str | Path = "historical", *, root: Path | str = ".",
                clients: Sequence[str] | None = None, overrides: Overrides | None = None) -> RunConfig:
    """Load environment -> mode -> clients -> overrides into one validated `RunConfig`.

    Args:
        env: environment name (`<root>/environments/<env>.yaml`) or a path to a YAML file.
        mode: mode name (`<root>/modes/<mode>.yaml`) or a path to a YAML file.
        root: folder holding clients/, environments/, modes/; relative paths in the config resolve here.
        clients: only these client ids (default: every `<root>/clients/*.yaml`).
        overrides: command-line values; they win over every file.

    Raises:
        ConfigError: naming the file, line and dotted field of the first problem found.
    """
    root_path, ov = Path(root), overrides or Overrides()
    environment, env_path, overridden = _load_environment(env, root_path)
    mode_path, _ = _resolve("modes", mode, root_path)
    preset = load_mode(mode, root=root_path)

    registry_dir = root_path / environment.paths.registry_dir
    known_models = registry_model_ids(registry_dir)
    loaded: list[ClientConfig] = []
    files = {"environment": str(env_path.resolve()), "mode": str(mode_path.resolve())}
    for path in _client_paths(root_path, clients):
        client, node = _load_client(path)
        _check_models(client, node, path, registry_dir, known_models)
        loaded.append(client)
        files[f"client:{client.id}"] = str(path.resolve())
    if ov.strategies:
        loaded = _select_strategies(loaded, ov.strategies)
        kept = {f"client:{c.id}" for c in loaded}
        files = {k: v for k, v in files.items() if not k.startswith("client:") or k in kept}

    data_source = ov.data_source or (
        preset.data_source if preset.data_source != "environment"
        else _MARKET_DATA_SOURCE[environment.dependencies.market_data])
    start, end = ov.start or preset.start, ov.end or preset.end
    if preset.name == Mode.LIVE:
        start, end = start or LIVE_START, end or LIVE_END
    for field, value in (("start", start), ("end", end)):
        if value is None:
            raise ConfigError(f"mode preset {str(preset.name)!r} has no {field}: set start and end in the "
                              f"preset or pass --start/--end", file=str(mode_path), field=field)
    fields: dict[str, Any] = dict(
        environment=environment, mode=preset, clients=loaded, data_source=data_source,
        inference=ov.inference or environment.dependencies.ml_inference, backend=ov.backend or "onnx",
        start=start, end=end, seed=preset.seed if ov.seed is None else ov.seed,
        root=str(root_path.resolve()), files=files, overrides=overridden)
    try:
        cfg = RunConfig(**fields)
    except ValidationError as exc:  # only overrides can be wrong here: every file was validated
        err = exc.errors()[0]
        name = str(err["loc"][0])
        raise ConfigError(f"{err['msg']}{_got(err.get('input'))}",
                          field=f"--{name.replace('_', '-')}") from None
    if cfg.start >= cfg.end:
        raise ConfigError(f"start ({cfg.start.isoformat()}) must be before end ({cfg.end.isoformat()})",
                          field="--start" if ov.start or ov.end else "start",
                          file=None if ov.start or ov.end else str(mode_path))
    return cfg.model_copy(update={"config_hash": config_hash(cfg)})


# ---------------------------------------------------------------- show


_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@\s]*@")


def _redact(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _redact(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    if isinstance(value, str):
        if key.endswith("_env"):
            return f"{value} ({'set' if os.environ.get(value) else 'not set'})"
        return _URL_PASSWORD.sub(r"\g<head>***@", value)
    return value


def redacted(cfg: RunConfig) -> dict:
    """JSON-able dict of the resolved config for `config show`.

    `*_env` fields show the variable name and whether it is set, never its value; passwords inside
    URLs (`redis://user:pass@host`) become `***`. `overrides` names the variable behind each value
    that a `SIGNALGEN_*` variable set.
    """
    return _redact({**cfg.model_dump(mode="json"), "overrides": cfg.overrides})
