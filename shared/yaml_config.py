"""Typed configuration from YAML: dataclasses in, errors that name the file, key and line out.

Every config file of fedpath (site, server, simulation) is a tree of frozen dataclasses. This
module turns a YAML file into such a tree, checking types, unknown keys (with a "did you mean"),
and per-field rules declared next to the field (``check(...)``). Relative paths are resolved
against the YAML file's folder, so a config is valid wherever the command is started from.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar, Union

import yaml

from shared.errors import UserError

T = TypeVar("T")
Check = Callable[[Any], "str | None"]


class ConfigError(UserError, ValueError):
    """A configuration problem, already phrased for the person who wrote the file."""


class SettingError(ValueError):
    """A cross-field rule (``__post_init__``) broken by one setting: reported at that setting's
    line rather than its section's. ``key`` is the setting's path within the dataclass, dotted for
    a nested one ("federation.min_sites"); ``message`` follows the key, so it does not repeat it.
    Raised outside a config file (a dataclass built in code), ``str()`` names the key too."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


def check(rule: Check, default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A dataclass field with a validation rule: ``rule(value)`` returns an error text or None."""
    return dataclasses.field(default=default, metadata={"check": rule}, **kwargs)


# Small reusable rules.
def positive(value: float) -> str | None:
    try:
        return None if value > 0 and math.isfinite(value) else "must be a finite number > 0"
    except OverflowError:  # an int too large for a float
        return "must be a finite number > 0"


def fraction(value: float) -> str | None:
    return None if 0.0 <= value <= 1.0 else "must be between 0 and 1"


def tcp_port(value: int) -> str | None:
    return None if 1 <= value <= 65535 else "must be a TCP port (1-65535)"


def folder_rule(path: Path) -> str | None:
    """A folder the program creates or fills: a file already there would fail it later, mid-work."""
    return f"{path} is a file, not a folder" if path.exists() and not path.is_dir() else None


def at_least(minimum: float) -> Check:
    return lambda value: None if value >= minimum else f"must be >= {minimum}"


def between(minimum: float, maximum: float) -> Check:
    return lambda value: None if minimum <= value <= maximum else f"must be between {minimum:,} and {maximum:,}"


EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
"""Numbers in exponent form that YAML 1.1 leaves as text unless they hold a dot (1e-5, 2E3)."""


def _compose_with_lines(text: str, source: str) -> tuple[Any, dict[tuple[str, ...], int]]:
    """Parse YAML keeping the line (1-based) where every mapping key stands."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    lines: dict[tuple[str, ...], int] = {}

    def build(node: yaml.Node | None, path: tuple[str, ...]) -> Any:
        if node is None:
            return None
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = str(key_node.value)
                if key in out:  # YAML would keep the last silently: a second `privacy:` could turn DP off
                    dotted = ".".join(path + (key,))
                    raise ConfigError(f"{source}:{key_node.start_mark.line + 1}: {dotted}: given twice (first on "
                                      f"line {lines[path + (key,)]}); keep one and merge what both say")
                lines[path + (key,)] = key_node.start_mark.line + 1
                out[key] = build(value_node, path + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [build(child, path + (str(i),)) for i, child in enumerate(node.value)]
        return yaml.safe_load(yaml.serialize(node))

    return build(root, ()), lines


class _Reader:
    """Walks the parsed YAML alongside the dataclass fields, collecting every error at once."""

    def __init__(self, source: str, lines: dict[tuple[str, ...], int], base_dir: Path | None):
        self.source = source
        self.lines = lines
        self.base_dir = base_dir
        self.errors: list[str] = []

    def where(self, path: tuple[str, ...]) -> str:
        probe = path
        while probe and probe not in self.lines:
            probe = probe[:-1]
        line = self.lines.get(probe)
        key = ".".join(path) or "(top level)"
        return f"{self.source}:{line}: {key}" if line else f"{self.source}: {key}"

    def error(self, path: tuple[str, ...], message: str) -> None:
        self.errors.append(f"{self.where(path)}: {message}")

    def dataclass(self, cls: type[T], data: Any, path: tuple[str, ...]) -> T | None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.error(path, f"expected a mapping of settings, got {type(data).__name__}")
            return None
        errors_before = len(self.errors)
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        for key in data:
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(fields)}"
                self.error(path + (key,), f"unknown setting{hint}")
        kwargs: dict[str, Any] = {}
        for name, field in fields.items():
            sub = path + (name,)
            if name not in data:
                if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                    if dataclasses.is_dataclass(hints[name]):
                        data[name] = {}
                    else:
                        self.error(sub, "required setting is missing")
                        continue
                else:
                    continue
            value = self.value(hints[name], data[name], sub)
            if value is _INVALID:
                continue
            rule = field.metadata.get("check")
            problem = rule(value) if rule and value is not None else None
            if problem:
                self.error(sub, f"{problem} (got {data[name]!r})")
                continue
            kwargs[name] = value
        if len(self.errors) > errors_before:
            return None
        try:
            return cls(**kwargs)
        except SettingError as exc:
            self.error(path + tuple(exc.key.split(".")), exc.message)
            return None
        except (ValueError, TypeError) as exc:  # cross-field rules in __post_init__
            self.error(path, str(exc))
            return None

    def value(self, hint: Any, raw: Any, path: tuple[str, ...]) -> Any:
        origin = typing.get_origin(hint)
        if origin in (Union, types.UnionType):
            options = typing.get_args(hint)
            if raw is None and type(None) in options:
                return None
            options = tuple(o for o in options if o is not type(None))
            if len(options) == 1:
                return self.value(options[0], raw, path)
            for option in options:
                probe = _Reader(self.source, self.lines, self.base_dir)
                result = probe.value(option, raw, path)
                if not probe.errors:
                    return result
            self.error(path, f"expected {_describe(hint)}, got {raw!r}")
            return _INVALID
        if origin is Literal:
            allowed = typing.get_args(hint)
            if raw in allowed:
                return raw
            self.error(path, f"must be one of {', '.join(map(repr, allowed))}, got {raw!r}")
            return _INVALID
        if origin in (tuple, list):
            if not isinstance(raw, list):
                self.error(path, f"expected a list, got {raw!r}")
                return _INVALID
            item_hint = typing.get_args(hint)[0]
            items = [self.value(item_hint, item, path + (str(i),)) for i, item in enumerate(raw)]
            return _INVALID if _INVALID in items else origin(items)
        if dataclasses.is_dataclass(hint):
            result = self.dataclass(hint, raw, path)
            return _INVALID if result is None else result
        if hint is bool:
            if isinstance(raw, bool):
                return raw
        elif hint is int:
            if isinstance(raw, int) and not isinstance(raw, bool):
                return raw
        elif hint is float:
            if isinstance(raw, str) and EXPONENT_NUMBER.fullmatch(raw.strip()):
                raw = float(raw)  # YAML 1.1 reads 1e-5 (no dot) as text; everyone means the number
            if isinstance(raw, (int, float)) and not isinstance(raw, bool):
                try:
                    return float(raw)
                except OverflowError:  # an integer of hundreds of digits (JSON and YAML allow them)
                    self.error(path, f"must be a finite number, got an integer of {len(str(raw))} digits")
                    return _INVALID
        elif hint is str:
            if isinstance(raw, (str, int, float)) and not isinstance(raw, bool):
                return str(raw)
        elif hint is Path:
            if isinstance(raw, str) and raw:
                path_value = Path(raw).expanduser()
                if not path_value.is_absolute() and self.base_dir is not None:
                    path_value = self.base_dir / path_value
                return path_value
        else:
            raise TypeError(f"unsupported config type {hint!r}")
        self.error(path, f"expected {_describe(hint)}, got {raw!r}")
        return _INVALID


_INVALID = object()


def _describe(hint: Any) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "text", Path: "a path"}
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint) if h is not type(None))
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def parse_config(cls: type[T], data: Any, source: str = "<config>", base_dir: Path | None = None,
                 lines: dict[tuple[str, ...], int] | None = None) -> T:
    """Build ``cls`` from already-parsed data; raises ConfigError listing every problem."""
    reader = _Reader(source, lines or {}, base_dir)
    result = reader.dataclass(cls, data, ())
    if reader.errors or result is None:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(reader.errors or [f"{source}: invalid"]))
    return result


def load_config(cls: type[T], path: str | Path) -> T:
    """Read a YAML file into the dataclass ``cls``, with errors that name key and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    data, lines = _compose_with_lines(text, str(path))
    return parse_config(cls, data, str(path), path.resolve().parent, lines)
