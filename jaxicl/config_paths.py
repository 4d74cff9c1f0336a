"""Dotted paths into nested frozen config dataclasses: the one walker behind command-line overrides
(`train.lr=3e-4`) and sweep axes (`--sweep train.lr=...`), so a field has the same name in both.

A path is a dotted field path (`train.lr`) or, when unique in the config, its last part (`lr`). A name that is
itself a path is that field, even where it is also the last part of nested paths, which then need their full paths.
Overrides parse text by the field's type; sweeps take numbers, for int and float fields only.
"""

import dataclasses
import math
import typing

from jaxicl.validation import ConfigError


def leaf_paths(cfg, prefix: str = "") -> list[str]:
    """Every non-dataclass field of cfg as a dotted path, nested configs expanded."""
    paths = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        paths += leaf_paths(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]
    return paths


def resolve(cfg, name: str) -> str:
    """The dotted path `name` names in cfg: `name` where it is a path of cfg, even where other paths end in `.name`
    (ar_gd_step's `init_scale` is its model's top-level field; its task's needs the full path `task.init_scale`),
    else the unique path ending in `.name`."""
    paths = leaf_paths(cfg)
    if name in paths:
        return name
    head = name.split(".")[0]
    nested = {f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))}
    if name in nested:
        raise ConfigError(f"{name} is a nested config; set one of its fields, e.g. {name}.<field>=...")
    matches = [p for p in paths if p.endswith("." + name)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConfigError(f"field {name!r} is ambiguous: it could be any of {matches}; give the full path")
    where = f" (no field {name.split('.', 1)[1]!r} in {head})" if head in nested and "." in name else ""
    raise ConfigError(f"unknown field {name!r} in {type(cfg).__name__}{where}; fields: {paths}")


def value_at(cfg, path: str):
    """The value of the dotted field `path` of cfg."""
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def field_type(cfg, path: str):
    parent, _, leaf = path.rpartition(".")
    return typing.get_type_hints(type(value_at(cfg, parent) if parent else cfg))[leaf]


def parse_text(text: str, kind, path: str):
    """The value of command-line text for a field of type `kind` (int, float, bool, str, Literal[...], tuples,
    X | None). A tuple is comma-separated: tuple[X, ...] of any length, a fixed tuple (tuple[int, float]) of exactly
    its items, each parsed by its own type. A Literal takes one of its values, the text parsed by each value's type."""
    origin = typing.get_origin(kind)
    if origin is typing.Literal:
        allowed = typing.get_args(kind)
        for value in allowed:
            try:
                if text.lower() == "none" if value is None else parse_text(text, type(value), path) == value:
                    return value
            except ConfigError:
                pass
        raise ConfigError(f"{path} must be one of {allowed}, got {text!r}")
    if origin is typing.Union or origin is type(int | None):  # X | None
        if text.lower() == "none":
            return None
        return parse_text(text, next(a for a in typing.get_args(kind) if a is not type(None)), path)
    if origin is tuple:
        items = typing.get_args(kind)
        if any(typing.get_origin(item) is tuple for item in items):
            raise ConfigError(f"{path} is a tuple of tuples, which a command line cannot spell; set it in a preset "
                              f"or in Python")
        texts = [t.strip() for t in text.split(",")] if text.strip() else []  # field= is the empty tuple
        if "" in texts:  # 1,,2 (a typo) was read as 1,2
            raise ConfigError(f"{path}: empty value in the comma-separated list {text!r}")
        if items[1:] == (...,):
            items = items[:1] * len(texts)
        elif len(texts) != len(items):
            names = ", ".join(getattr(item, "__name__", str(item)) for item in items)
            raise ConfigError(f"{path} takes {len(items)} comma-separated values (tuple[{names}]), got {len(texts)}")
        return tuple(parse_text(t, item, path) for t, item in zip(texts, items))
    if kind is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ConfigError(f"{path} expects true or false, got {text!r}")
    try:
        value = cast_number(float(text), int, path) if kind is int and "e" in text.lower() else kind(text)
    except ValueError:
        raise ConfigError(f"{path} expects a value of type {kind.__name__}, got {text!r}") from None
    if kind is float and not math.isfinite(value):  # a setting or threshold, never NaN or inf (JSON has neither)
        raise ConfigError(f"{path} expects a finite number, got {text!r}")
    return value


def cast_number(value, kind, path: str):
    """A swept number as the field's type; only int and float fields can be swept."""
    if kind is int:
        if not float(value).is_integer():
            raise ConfigError(f"field {path!r} takes integers, got {value!r}")
        return int(value)
    if kind is float:
        return float(value)
    raise ConfigError(f"field {path!r} has type {getattr(kind, '__name__', kind)}; only int and float "
                      "fields can be swept")


def replace(cfg, values: dict):
    """cfg with each dotted field path of `values` set to its value, each dataclass rebuilt once with all its new
    values, so its checks see them together: fields valid only together (train.schedule and train.warmup_steps,
    eval_every and train.steps_per_call) were refused one at a time, in either order."""
    fields, nested = {}, {}
    for path, value in values.items():
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            fields[head] = value
    fields |= {head: replace(getattr(cfg, head), sub) for head, sub in nested.items()}
    return dataclasses.replace(cfg, **fields)


def apply_overrides(cfg, assignments: list[str]):
    """cfg with "field=value" strings applied together (field: a path as `resolve` takes it; replace); a field set
    twice (under any of its names) is refused rather than the last one winning."""
    given, values, shown = {}, {}, []  # shown: each override as path=value
    for a in assignments:
        name, sep, text = a.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"override {a!r} must look like field=value (nested: train.lr=1e-3)")
        path = resolve(cfg, name.strip())
        if path in given:
            raise ConfigError(f"{path} is set twice: {given[path]!r} and {a!r}")
        given[path] = a
        shown.append(f"{path}={text.strip()}")
        try:
            values[path] = parse_text(text.strip(), field_type(cfg, path), path)
        except ConfigError as e:
            raise ConfigError(f"{shown[-1]}: {e}") from None
    try:
        return replace(cfg, values)
    except ConfigError as e:
        raise ConfigError(f"{' '.join(shown)}: {e}") from None
