"""SAFE-A: SAFE combined with an adapter (Tip-Adapter-F or APE-T) trained on SAFE-pooled features.

SAFE (its stored fit reused when the settings match) re-pools the train views, val and test from the cached
dense maps through the fine-tuned layer; each is feature-blended with the frozen layer's with the beta SAFE
chose on val. The adapter then trains and searches on those features exactly as on CLIP's own.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..params import Config, param
from .base import Estimator, Selection
from .registry import get_method, register
from .safe import SafeEstimator, blend_features, pool

ADAPTERS = ("tipf", "apet")


@dataclass
class SafeAConfig(Config):
    """The adapter's name, and the SAFE and adapter settings (each checked against its own declarations)."""

    OWNER = "safe-a"
    adapter: str = param("tipf", "str", "adapter trained on SAFE's features", choices=ADAPTERS)
    safe: dict = param(None, "mapping", "SAFE settings (as `safe`; blend is always feature)", optional=True)
    adapter_config: dict = param(None, "mapping", "the adapter's settings (as `tipf` or `apet`)", optional=True)

    def check(self) -> "SafeAConfig":
        super().check()
        # Nested settings are stored resolved, so two spellings of the same settings are one configuration.
        safe = {**(self.safe or {}), "blend": "feature"}
        self.safe = get_method("safe").make_config(safe).to_dict()
        self.adapter_config = get_method(self.adapter).make_config(self.adapter_config or {}).to_dict()
        return self


class _SafeFeatures:
    """A task over SAFE-blended features, in the shape the adapters read (no cache behind it)."""

    def __init__(self, task, X, X_y, keys, val_f, test_f):
        self.k, self.seed, self.device, self.progress = task.k, task.seed, task.device, task.progress
        self.val_is_test = task.val_is_test
        self.W, self.F, self.key_labels, self.L = task.W, keys, task.key_labels, task.L
        self.val_f, self.val_y, self.test_f, self.test_y = val_f, task.val_y, test_f, task.test_y
        self._X, self._y = X, X_y

    def train_views(self):
        return self._X, self._y

    def stored_refinements(self, variant):
        return []  # refinements stored for CLIP's features do not apply to SAFE's


class SafeA(Estimator):
    def fit(self, task) -> "SafeA":
        cfg = self.config
        safe_spec, ad_spec = get_method("safe"), get_method(cfg.adapter)
        self.safe = SafeEstimator(safe_spec.make_config(cfg.safe)).fit(task)
        self.safe.select(task)
        beta = self.safe.selection.params["beta"]
        src, labels = task.train_dense()
        f_ft = pool(src, self.safe.params, self.safe.heads, device=self.safe.config.device)
        raw = task.pooled_train_views_raw()  # (V, N, D), train_dense's order
        V, n, D = raw.shape
        f_orig = torch.nn.functional.normalize(raw.reshape(-1, D), dim=-1)
        X = blend_features(f_ft, f_orig, beta)
        keys = torch.nn.functional.normalize(X.reshape(V, n, D).mean(dim=0), dim=-1)
        dev = task.W.device
        self.sub = _SafeFeatures(task, X.to(dev), labels.to(dev), keys.to(dev), self.safe.blended("val").to(dev),
                                 self.safe.blended("test").to(dev))
        ad_cfg, self.notes = ad_spec.estimator.resolve(ad_spec.make_config(cfg.adapter_config), self.sub,
                                                       frozenset())
        self.adapter = ad_spec.estimator(ad_cfg).fit(self.sub)
        return self

    def select(self, task) -> Selection:
        sel = self.adapter.select(self.sub)
        return Selection(method="safe-a", params=sel.params, val_acc=sel.val_acc, test_acc=sel.test_acc,
                         extra=sel.extra)

    def extra(self) -> dict:
        out = {**self.adapter.extra(), "safe_beta": self.safe.selection.params["beta"],
               "safe_trained": self.safe.trained}
        if self.notes:
            out["adapter_notes"] = self.notes
        return out


register("safe-a", config=SafeAConfig, estimator=SafeA, trained=True, doc="docs/methods-safe.md",
         summary="SAFE-A: an adapter (tipf or apet) trained on SAFE-blended features")
