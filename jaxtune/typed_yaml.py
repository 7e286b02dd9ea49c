"""YAML + dotted overrides -> frozen dataclasses, with errors written for users.

The machinery behind `jaxtune.config` (which holds the schema and the defaults); nothing here knows a field
name. Values are read with YAML 1.2 rules (only ``true``/``false`` are booleans, ``1e-4`` is a number, ``yes``
is a string) and then checked against each field's annotation: ``bool``, ``int``, ``float``, ``str``,
``Literal[...]``, ``X | None`` and other unions, ``tuple[X, ...]``, ``list[X]``, ``dict[K, V]``, nested
dataclasses and ``Any``. Errors name the dotted field, the file and line (or the command-line override), what
was expected and what was given, and suggest the closest valid key or choice (difflib).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from jaxtune.errors import JaxtuneError


class ConfigError(JaxtuneError, ValueError):
    """A configuration problem, worded for the user: what is wrong, where, and what to do."""


class Invalid(ConfigError):
    """A failed ``__post_init__`` check; `build` adds the dotted prefix and the file/line."""

    def __init__(self, field: str, detail: str):
        super().__init__(f"{field} {detail}")
        self.field, self.detail = field, detail


_UNSET = object()


def check(ok: Any, field: str, detail: str, value: Any = _UNSET) -> None:
    """Raises Invalid("<field> <detail>, got <value>") unless `ok`."""
    if not ok:
        raise Invalid(field, detail if value is _UNSET else f"{detail}, got {value!r}")


def positive(cfg: Any, *names: str) -> None:
    """Each named field is None or > 0."""
    for n in names:
        v = getattr(cfg, n)
        check(v is None or v > 0, n, "must be > 0", v)


def non_negative(cfg: Any, *names: str) -> None:
    for n in names:
        v = getattr(cfg, n)
        check(v is None or v >= 0, n, "must be >= 0", v)


def fraction(cfg: Any, *names: str, closed: bool = True) -> None:
    """Each named field is in [0, 1] (closed) or [0, 1)."""
    for n in names:
        v = getattr(cfg, n)
        ok = v is None or (0 <= v <= 1 if closed else 0 <= v < 1)
        check(ok, n, f"must be in [0, 1{']' if closed else ')'}", v)


def regexes(cfg: Any, *names: str) -> None:
    """Each named field (a list of regexes, or a mapping keyed by them) compiles."""
    for n in names:
        for pattern in getattr(cfg, n):
            try:
                re.compile(pattern)
            except re.error as e:
                raise Invalid(n, f"holds an invalid regular expression {pattern!r} ({e})") from None


# ----------------------------------------------------------------------------------------------- YAML


def _yaml_classes() -> tuple[type, type]:
    """A YAML 1.2-flavoured loader and a dumper that quotes any string either YAML version would misread."""
    float_re = re.compile(
        r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?  # 1.5, 2.e3
        |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+  # 1e-4 (a string in YAML 1.1)
        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?  # .5
        |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""",
        re.X,
    )
    bool_re = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
    float_tag, bool_tag = "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool"

    class Loader(yaml.SafeLoader):
        yaml_implicit_resolvers = {
            k: [(t, r) for t, r in v if t not in (float_tag, bool_tag)]
            for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
        }

    class Dumper(yaml.SafeDumper):
        yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeDumper.yaml_implicit_resolvers.items()}

    for cls in (Loader, Dumper):
        cls.add_implicit_resolver(float_tag, float_re, list("-+0123456789."))
    Loader.add_implicit_resolver(bool_tag, bool_re, list("tTfF"))
    return Loader, Dumper


Loader, Dumper = _yaml_classes()


def yaml_value(text: str) -> Any:
    loader = Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def dump(data: Any) -> str:
    return yaml.dump(data, Dumper=Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)


def read_yaml(path: Path) -> tuple[Any, dict[str, int]]:
    """The data, and the 1-based line of every dotted key (``training.learning_rate``, ``data.train[1]``)."""
    if not path.is_file():
        what = "is a directory, not a YAML file" if path.is_dir() else "not found"
        raise ConfigError(f"config file '{path}' {what} (working directory: {Path.cwd()}).")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"could not read {path}: not UTF-8 text (byte {e.start}, line {line}); save it as UTF-8."
        ) from None
    loader = Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where, lines = "", text.splitlines()
        if mark:
            shown = lines[mark.line].strip() if mark.line < len(lines) else ""
            where = f", line {mark.line + 1}, column {mark.column + 1}" + (f" ({shown!r})" if shown else "")
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(
            f"could not parse {path}{where}: {problem}. Check the indentation there, and quote values "
            "that contain ': ' or ' #'."
        ) from None
    finally:
        loader.dispose()
    lines: dict[str, int] = {}
    _key_lines(node, "", lines, path)
    return data, lines


def _dotted(key: str, where: str) -> str:
    head, _, rest = key.partition(".")
    return f"key '{key}' ({where}): write it nested ({head}: {{{rest}: ...}}); dotted keys are for command-line overrides."


def _key_lines(node: Any, prefix: str, out: dict[str, int], path: Path) -> None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = f"{prefix}.{k.value}" if prefix else str(k.value)
            if key in out:
                line = k.start_mark.line + 1
                if "." in str(k.value):  # `model.path: x` beside `model: {path: y}`
                    raise ConfigError(_dotted(str(k.value), f"{path}, line {line}"))
                raise ConfigError(
                    f"key '{key}' appears twice in {path} (lines {out[key]} and {line}); keep one."
                )
            out[key] = k.start_mark.line + 1
            _key_lines(v, key, out, path)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out[f"{prefix}[{i}]"] = v.start_mark.line + 1
            _key_lines(v, f"{prefix}[{i}]", out, path)


def parse_overrides(overrides: Sequence[str]) -> list[tuple[list[str], Any, str]]:
    """``section.field=value`` strings -> (key path, YAML-parsed value, original text)."""
    out = []
    for text in overrides:
        key, sep, raw = text.removeprefix("--").partition("=")
        if not sep or not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) for p in key.split(".")):
            raise ConfigError(
                f"override '{text}' must look like section.field=value, e.g. training.learning_rate=1e-4 "
                "or data.train=[a.json,b.json]."
            )
        try:
            value = yaml_value(raw)
        except yaml.YAMLError:
            value = raw  # not YAML (e.g. "a: b: c"): the text as it is
        if isinstance(value, dict) and not raw.lstrip().startswith("{"):
            value = raw  # "Answer: yes" is a string, not a mapping
        out.append((key.split("."), value, text))
    return out


# ----------------------------------------------------------------------------------------------- checking


@dataclasses.dataclass
class Origin:
    """Where the raw values came from, so that errors can say so."""

    root: type  # the top-level dataclass, to find a field that was put in the wrong section
    file: str | None = None
    lines: dict[str, int] = dataclasses.field(default_factory=dict)
    overrides: dict[str, str] = dataclasses.field(default_factory=dict)  # dotted key -> override text

    def where(self, key: str) -> str:
        """The override that set `key` (or its section), else the file line of `key` or its nearest parent."""
        probe = key
        while probe:
            for k, text in self.overrides.items():
                if probe == k or key.startswith((f"{k}.", f"{k}[")) or k.startswith(f"{probe}."):
                    return f" (command-line override '{text}')"
            if probe in self.lines:
                return f" ({self.file}, line {self.lines[probe]})"
            probe = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", probe) if re.search(r"[.\[]", probe) else ""
        return f" ({self.file})" if self.file else ""


class _Mismatch(Exception):
    """A value does not fit an annotation; turned into a ConfigError at the field that holds it."""


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def describe(tp: Any) -> str:
    """An annotation in words: ``float | None`` -> "a number or null"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if tp in names:
        return names[tp]
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin in (tuple, list):
        return f"a list (each {describe(args[0])})" if args else "a list"
    if origin is dict or tp is dict:
        return f"a mapping (each value {describe(args[1])})" if args and args[1] is not Any else "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, origin: Origin) -> Any:
    """`value` as type `tp`, or _Mismatch; an invalid choice or a nested problem is a ConfigError already."""
    o, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key, origin)
    if o is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else "."
        raise ConfigError(f"{key} must be {describe(tp)}, got {value!r}{origin.where(key)}{hint}")
    if o in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is not type(None):
                try:
                    return _coerce(value, a, key, origin)
                except _Mismatch:
                    pass
        raise _Mismatch
    if o in (tuple, list):
        fixed = bool(args) and args[-1] is not Ellipsis
        if isinstance(value, (str, Mapping)) or not isinstance(value, Sequence):
            if value is None or fixed:
                raise _Mismatch
            value = [value]  # a single item where a list is expected
        if fixed and len(value) != len(args):
            raise _Mismatch
        types_ = args if fixed else [args[0] if args else Any] * len(value)
        items = [_coerce(v, t, f"{key}[{i}]", origin) for i, (v, t) in enumerate(zip(value, types_))]
        return tuple(items) if o is tuple else items
    if o is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch
        kt, vt = args or (Any, Any)
        return {_coerce(k, kt, key, origin): _coerce(v, vt, f"{key}.{k}", origin) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if isinstance(value, bool):
        raise _Mismatch  # true/false is never a number or a string here
    if tp is float and isinstance(value, (int, float, str)):
        try:
            return float(value)
        except ValueError:
            raise _Mismatch from None
    if tp is int:
        if isinstance(value, str):
            try:
                value = float(value) if re.search(r"[.eEn]", value) else int(value)
            except ValueError:
                raise _Mismatch from None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int):
            return value
        raise _Mismatch
    if tp is str:
        if isinstance(value, (str, int, float)):
            return str(value)
        raise _Mismatch
    if isinstance(tp, type) and not isinstance(value, tp):
        raise _Mismatch
    return value


def build(cls: type, value: Any, key: str, origin: Origin) -> Any:
    """Dataclass `cls` from a mapping, checking every key and value. ``cls.ALIASES`` maps old names."""
    if isinstance(value, cls):
        return value
    if value is None:
        value = {}  # a section header with every line commented out
    if not isinstance(value, Mapping):
        raise _Mismatch
    types_, names = hints(cls), [f.name for f in dataclasses.fields(cls)]
    prefix = f"{key}." if key else ""
    kwargs = {}
    for k, v in value.items():
        k = getattr(cls, "ALIASES", {}).get(k, k)
        if k not in names:
            if isinstance(k, str) and k.partition(".")[0] in names:  # `training.learning_rate: 1e-4` in a file
                raise ConfigError(_dotted(k, origin.where(f"{prefix}{k}").strip(" ()") or "the config"))
            raise ConfigError(_unknown_key(f"{prefix}{k}", names, prefix, origin))
        try:
            kwargs[k] = _coerce(v, types_[k], f"{prefix}{k}", origin)
        except _Mismatch:
            raise ConfigError(
                f"{prefix}{k} expects {describe(types_[k])} but got {type(v).__name__} {v!r}"
                f"{origin.where(f'{prefix}{k}')}."
            ) from None
    try:
        built = cls(**kwargs)
    except Invalid as e:
        full = f"{prefix}{e.field}"
        raise ConfigError(f"{full} {e.detail}{origin.where(full)}.") from None
    object.__setattr__(built, ORIGIN_ATTR, (origin, key))  # not a field: equality, to_dict and dumps ignore it
    return built


# The attribute `build` sets on every dataclass it makes: (its Origin, its dotted key), so that a check made
# after loading (a model that lacks a target module, a stage that cannot export a method) can name the file
# and line of the key, or the override, as the load-time errors do. `dataclasses.replace` drops it on the
# instance it makes, so `origin_of` also asks the sections the replaced config kept.
ORIGIN_ATTR = "_typed_yaml_origin"


def origin_of(cfg: Any) -> tuple[Origin, str] | None:
    """(Origin, dotted key of `cfg`) of a dataclass `build` made, or of the sections it holds; else None."""
    found = getattr(cfg, ORIGIN_ATTR, None)
    if found is not None or not dataclasses.is_dataclass(cfg):
        return found
    for f in dataclasses.fields(cfg):
        section = getattr(getattr(cfg, f.name, None), ORIGIN_ATTR, None)
        if section is not None and section[1] == f.name:  # a top-level section: its parent is the root
            return section[0], ""
    return None


def where(cfg: Any, key: str) -> str:
    """" (FILE, line N)" / " (command-line override 'K=V')" for dotted `key` of `cfg` (relative to it), or ""
    when `cfg` was not loaded by `load` (built in code) or nothing locates the key."""
    found = origin_of(cfg)
    if found is None:
        return ""
    origin, prefix = found
    return origin.where(f"{prefix}.{key}" if prefix else key)


def _unknown_key(full: str, valid: list[str], prefix: str, origin: Origin) -> str:
    name = full.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, valid, n=1)
    if close:
        hint = f"did you mean '{prefix}{close[0]}'?"
    else:  # maybe the right field in the wrong section (training.beta -> dpo.beta)
        sections = [
            f for f in dataclasses.fields(origin.root) if dataclasses.is_dataclass(hints(origin.root)[f.name])
        ]
        where = [
            s.name
            for s in sections
            if name in {f.name for f in dataclasses.fields(hints(origin.root)[s.name])}
        ]
        hint = f"did you mean '{where[0]}.{name}'?" if where else f"valid keys here: {', '.join(valid)}."
    return f"unknown key '{full}'{origin.where(full)}; {hint}"


def load(root: type, source: Any, overrides: Sequence[str] = ()) -> Any:
    """An instance of dataclass `root` from a YAML path, a mapping or an instance, then dotted overrides."""
    origin = Origin(root)
    if source is None or isinstance(source, root) or isinstance(source, Mapping):
        data = to_dict(source or {})  # a deep copy: overrides never touch the caller's dict
        kept = origin_of(source) if isinstance(source, root) else None
        if kept is not None and not kept[1]:  # a loaded config again: keep where its values came from
            origin = dataclasses.replace(kept[0], lines=dict(kept[0].lines), overrides=dict(kept[0].overrides))
    else:
        origin.file = str(source)
        data, origin.lines = read_yaml(Path(source))
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{origin.file} must be a mapping of sections (section: {{field: value}}), got {type(data).__name__}."
        )
    data, aliases = dict(data), getattr(root, "ALIASES", {})
    for old, new in aliases.items():
        if old in data:
            if new in data:
                raise ConfigError(
                    f"{origin.file or 'the config'} has both '{old}' and '{new}', two names for the same "
                    f"section; keep '{new}'."
                )
            data[new] = data.pop(old)
            origin.lines = {re.sub(rf"^{old}\b", new, k): v for k, v in origin.lines.items()}
    for path, value, text in parse_overrides(overrides):
        path[0] = aliases.get(path[0], path[0])
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(
                    f"override '{text}': '{'.'.join(path[: i + 1])}' is a value, not a section."
                )
            node = child
        node[path[-1]] = value
        origin.overrides[".".join(path)] = text
    return build(root, data, "", origin)


def to_dict(cfg: Any) -> Any:
    """Plain dicts, lists and scalars (YAML/JSON-ready), recursively."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg
