"""Declared, validated method settings: every parameter is declared once and checked by one function.

A method's settings are a dataclass deriving from `Config` whose fields are made with `param(...)`:
name, type, default, allowed range or choices, help text. `check_value` is the one checker every value goes
through (--set, presets, sweep grids, fit-safe options, Python callers); `Config.from_dict` builds a checked
config; `Config.spec()` lists the declarations (the CLI and docs/eval.md are generated from it).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from .errors import CachekitError

__all__ = ["Param", "param", "Config", "check_value", "is_int", "is_num"]


def is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_num(v) -> bool:
    """A finite real number (bool excluded)."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) \
        and math.isfinite(float(v))


@dataclass(frozen=True)
class Param:
    """One declared parameter. `type` is one of: int, float, bool, str, floats (a list of `length` numbers),
    ints (likewise integers), strs (a non-empty list of distinct strings from `choices`), mapping (nested settings), device."""

    name: str
    type: str
    default: Any
    help: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    choices: tuple | None = None
    length: int | None = None
    optional: bool = False  # None allowed (it means what `help` says)
    search: bool = False  # a search grid setting (not a training setting)
    max_points: int | None = None  # ints: the most their product may be (a search grid's point count)

    def describe_range(self) -> str:
        parts = []
        if self.choices:
            parts.append("one of " + ", ".join(map(str, self.choices)))
        if self.ge is not None:
            parts.append(f">= {self.ge:g}")
        if self.gt is not None:
            parts.append(f"> {self.gt:g}")
        if self.le is not None:
            parts.append(f"<= {self.le:g}")
        if self.length is not None:
            parts.append(f"{self.length} values")
        if self.max_points is not None:
            parts.append(f"product <= {self.max_points:,}")
        if self.optional:
            parts.append("or null")
        return ", ".join(parts)


def param(default, type: str, help: str, **rules):
    """A dataclass field carrying its declaration (see Param)."""
    if isinstance(default, list):
        default = tuple(default)
    return field(default=default, metadata={"param": (type, help, rules)})


def _want(p: Param) -> str:
    kind = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
            "floats": f"a list of {p.length} numbers", "ints": f"a list of {p.length} integers", "strs": "a list of names", "mapping": "a mapping",
            "device": "a torch device string such as cpu or cuda"}[p.type]
    rng = p.describe_range()
    return f"{kind} ({rng})" if rng else kind


def check_value(owner: str, p: Param, value):
    """The one checker: returns the value in canonical form (tuples for lists) or raises a one-line error."""
    def bad():
        example = p.default if p.default is not None else "null"
        if isinstance(example, tuple):
            example = list(example)
        return CachekitError(f"{owner}.{p.name}={_show(value)} is invalid: expected {_want(p)}; "
                             f"fix: e.g. --set {owner}.{p.name}={_show(example)}")

    if value is None:
        if p.optional:
            return None
        raise bad()
    t = p.type
    if t == "int":
        if not is_int(value):
            raise bad()
        value = int(value)
    elif t == "float":
        if not is_num(value):
            raise bad()
        value = float(value)
    elif t == "bool":
        if not isinstance(value, (bool, np.bool_)):
            raise bad()
        value = bool(value)
    elif t == "str":
        if not isinstance(value, str) or (p.choices and value not in p.choices):
            raise bad()
    elif t == "device":
        import torch

        if not isinstance(value, str):
            raise bad()
        try:
            torch.device(value)
        except (RuntimeError, TypeError, ValueError):
            raise bad() from None
    elif t == "floats":
        if not isinstance(value, (list, tuple)) or len(value) != p.length or not all(is_num(x) for x in value):
            raise bad()
        value = tuple(float(x) for x in value)  # 7 and 7.0 are one setting (and one record key)
        for x in value:
            _range(p, x, bad)
        return value
    elif t == "ints":
        if not isinstance(value, (list, tuple)) or len(value) != p.length or not all(is_int(x) for x in value):
            raise bad()
        value = tuple(int(x) for x in value)
        for x in value:
            _range(p, x, bad)
        points = math.prod(value)
        if p.max_points is not None and points > p.max_points:
            raise CachekitError(f"{owner}.{p.name}={list(value)} asks for {points:,} grid points; the limit is "
                                f"{p.max_points:,} (the default grid has {math.prod(p.default):,}); fix: use fewer "
                                f"steps, e.g. --set {owner}.{p.name}=[{','.join(map(str, p.default))}]")
        return value
    elif t == "strs":
        if isinstance(value, str):
            value = (value,)
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(x, str) for x in value) \
                or len(set(value)) != len(value) or (p.choices and any(x not in p.choices for x in value)):
            raise bad()
        return tuple(value)
    elif t == "mapping":
        if not isinstance(value, Mapping):
            raise bad()
        return dict(value)
    else:  # pragma: no cover - a declaration error
        raise TypeError(f"unknown parameter type {t!r}")
    if t in ("int", "float"):
        _range(p, value, bad)
    return value


def _range(p: Param, x, bad):
    if p.ge is not None and x < p.ge:
        raise bad()
    if p.gt is not None and x <= p.gt:
        raise bad()
    if p.le is not None and x > p.le:
        raise bad()


def _show(v) -> str:
    import json

    try:
        return json.dumps(list(v) if isinstance(v, tuple) else v)
    except (TypeError, ValueError):
        return repr(v)


class Config:
    """Base of every method's settings dataclass. Subclasses set OWNER (the method name in messages)."""

    OWNER = "method"

    @classmethod
    def spec(cls) -> list[Param]:
        out = []
        for f in dataclasses.fields(cls):
            if "param" not in f.metadata:
                continue
            type_, help_, rules = f.metadata["param"]
            out.append(Param(f.name, type_, f.default, help_, **rules))
        return out

    @classmethod
    def spec_by_name(cls) -> dict[str, Param]:
        return {p.name: p for p in cls.spec()}

    @classmethod
    def from_dict(cls, d: Mapping | None = None):
        """A checked config from user settings (unknown names and bad values are one-line errors)."""
        d = {} if d is None else d
        if not isinstance(d, Mapping):
            raise CachekitError(f"{cls.OWNER} settings must be a mapping, got {type(d).__name__}; "
                                "fix: pass NAME: VALUE pairs")
        spec = cls.spec_by_name()
        unknown = [k for k in d if k not in spec]
        if unknown:
            raise CachekitError(f"unknown parameter {unknown[0]!r} of method {cls.OWNER}; fix: valid parameters are "
                                f"{', '.join(spec) or 'none'}")
        values = {k: check_value(cls.OWNER, spec[k], v) for k, v in d.items()}
        cfg = cls(**values)
        cfg.check()
        return cfg

    def check(self):
        """Cross-field rules (e.g. warm-up within epochs); single values are checked by check_value."""
        spec = self.spec_by_name()
        for name, p in spec.items():
            object.__setattr__(self, name, check_value(self.OWNER, p, getattr(self, name)))
        return self

    # Older name kept: every config used to have its own validate().
    validate = check

    def to_dict(self) -> dict:
        """JSON-ready settings (tuples as lists), every declared parameter."""
        out = {}
        for p in self.spec():
            v = getattr(self, p.name)
            out[p.name] = list(v) if isinstance(v, tuple) else v
        return out

    def replace(self, **changes):
        return type(self).from_dict({**self.to_dict(), **changes})

    def _fail(self, name: str, why: str):
        raise CachekitError(f"{self.OWNER}.{name}={_show(getattr(self, name))} is invalid: {why}")
