"""`field=value` command-line overrides of (nested) frozen config dataclasses."""

import dataclasses
import typing

from jaxicl.validation import ConfigError


def _parse(text: str, kind, field: str):
    origin = typing.get_origin(kind)
    if origin is typing.Union or origin is type(int | None):  # X | None
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if text.lower() == "none":
            return None
        return _parse(text, args[0], field)
    if origin is tuple:
        item = typing.get_args(kind)[0]
        return tuple(_parse(t, item, field) for t in text.split(",") if t.strip())
    if kind is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ConfigError(f"{field} expects true or false, got {text!r}")
    try:
        return kind(float(text)) if kind is int and "e" in text.lower() else kind(text)
    except ValueError:
        raise ConfigError(f"{field} expects a value of type {kind.__name__}, got {text!r}") from None


def apply_override(cfg, path: str, text: str, _parent: str = ""):
    """cfg with the (dotted) field `path` set from text, e.g. path="train.lr", text="3e-4"."""
    head, _, rest = path.partition(".")
    where = f"{_parent}{head}"
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    if head not in fields:
        raise ConfigError(f"unknown field {where!r} in {type(cfg).__name__}; allowed: {sorted(fields)}")
    current = getattr(cfg, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"{where} is not a nested config, so {_parent + path!r} is not a field")
        return dataclasses.replace(cfg, **{head: apply_override(current, rest, text, f"{where}.")})
    if dataclasses.is_dataclass(current):
        raise ConfigError(f"{where} is a nested config; set one of its fields, e.g. {where}.<field>=...")
    kind = typing.get_type_hints(type(cfg))[head]
    value = _parse(text, kind, where)
    try:
        return dataclasses.replace(cfg, **{head: value})
    except ConfigError as e:
        raise ConfigError(f"{where}={text}: {e}") from None


def apply_overrides(cfg, assignments: list[str]):
    """Applies "field=value" strings in order."""
    for a in assignments:
        path, sep, text = a.partition("=")
        if not sep or not path:
            raise ConfigError(f"override {a!r} must look like field=value (nested: train.lr=1e-3)")
        cfg = apply_override(cfg, path.strip(), text.strip())
    return cfg
