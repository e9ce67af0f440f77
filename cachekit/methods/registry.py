"""The method registry: every method is registered once, by name, with its Config and Estimator.

The runner, `--set METHOD.PARAM=...`, sweep grids, presets, docs/eval.md and the fit-safe options all read
it. Adding a method: write its module (Config, pure functions, Estimator) and call `register` at its end,
then add the module name to BUILTIN below.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..errors import CachekitError

__all__ = ["MethodSpec", "register", "get_method", "list_methods", "BUILTIN"]

#: Modules of cachekit.methods that register a method when imported, in the order methods are listed.
BUILTIN = ("zeroshot", "tip", "ape", "gda", "tipf", "apet", "safe", "safe_a")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config: type  # a cachekit.params.Config subclass
    estimator: type  # a cachekit.methods.base.Estimator subclass
    summary: str
    trained: bool = False
    doc: str = ""  # the docs page with its formula and defaults

    def defaults(self) -> dict:
        """Declared defaults, with what they imply resolved (e.g. SAFE's warm-up)."""
        return self.config.from_dict({}).to_dict()

    def make_config(self, overrides: dict | None = None):
        """A checked config: declared defaults, then `overrides` (None values are ignored)."""
        return self.config.from_dict({k: v for k, v in (overrides or {}).items() if v is not None})


_REGISTRY: dict[str, MethodSpec] = {}
_loaded = False


def register(name: str, *, config: type, estimator: type, summary: str, trained: bool = False, doc: str = ""):
    if name in _REGISTRY and _REGISTRY[name].estimator is not estimator:
        raise ValueError(f"method {name!r} is registered twice")
    config.OWNER = name
    _REGISTRY[name] = MethodSpec(name, config, estimator, summary, trained, doc)
    return _REGISTRY[name]


def _load():
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in BUILTIN:
            importlib.import_module(f"cachekit.methods.{mod}")


def list_methods() -> list[str]:
    _load()
    order = {m: i for i, m in enumerate(BUILTIN)}
    return sorted(_REGISTRY, key=lambda n: order.get(n.replace("-", "_"), len(order)))


def get_method(name: str) -> MethodSpec:
    _load()
    if name not in _REGISTRY:
        raise CachekitError(f"unknown method {name!r}; fix: one of {', '.join(list_methods())}")
    return _REGISTRY[name]
