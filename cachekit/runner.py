"""Run methods on a cache: load the tensors once per (K, seed), select on val, report test.

This is the only place that joins the cache (files) and the methods (pure tensor functions).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import lru_cache

import torch

from . import __version__
from .cache import Cache
from .errors import CachekitError
from .methods import ape, refine, tip, zeroshot

TRAINING_FREE = ("zeroshot", "tip", "ape", "gda")
TRAINED = ("tipf", "apet", "safe", "safe-a")

# User-settable hyper-parameters per method and their defaults (presets and --set override them).
DEFAULTS: dict[str, dict] = {
    "zeroshot": {},
    "tip": {"s": [7, 7], "n": [200, 20]},
    "ape": {"top_k": 500, "weights": [0.5, 0.5], "s": [7, 7, 1], "n": [200, 20, 20]},
    "gda": {},
}


def _safe_defaults() -> dict:
    from .methods.safe import SafeConfig

    return {**SafeConfig().to_dict(), "blend": "feature"}


def _adapter_defaults() -> dict[str, dict]:
    from .methods.apet import APETConfig
    from .methods.tipf import TipFConfig

    return {"tipf": {**TipFConfig().to_dict(), "s": [7, 7], "n": [200, 20]},
            "apet": {**APETConfig().to_dict(), "top_k": 500, "weights": [0.2, 0.8], "s": [7, 7], "n": [200, 20]}}


DEFAULTS["safe"] = _safe_defaults()
DEFAULTS.update(_adapter_defaults())
# SAFE-A: an adapter trained on SAFE-pooled features; `safe` and `adapter_config` override those defaults.
DEFAULTS["safe-a"] = {"adapter": "tipf", "safe": {}, "adapter_config": {}}
_SEARCH_KEYS = ("s", "n", "top_k", "weights")


@dataclass
class Inputs:
    """Everything the training-free methods read, for one few-shot set."""

    W: torch.Tensor  # (C, D) text classifier
    F: torch.Tensor  # (N, D) keys: mean of augmented views, normalised
    key_labels: torch.Tensor  # (N,)
    L: torch.Tensor  # (N, C) one-hot
    val_f: torch.Tensor
    val_y: torch.Tensor
    test_f: torch.Tensor
    test_y: torch.Tensor


def method_params(method: str, overrides: dict | None = None) -> dict:
    if method not in DEFAULTS:
        raise CachekitError(f"unknown method {method!r}; fix: one of {', '.join(DEFAULTS)}")
    params = dict(DEFAULTS[method])
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k not in params:
            valid = ", ".join(params) or "none"
            raise CachekitError(f"method {method} has no parameter {k!r}; fix: valid parameters are {valid}")
        _check_type(method, k, v, params[k])
        params[k] = v
    if method == "safe-a":
        if params["adapter"] not in ("tipf", "apet"):
            raise CachekitError(f"safe-a adapter {params['adapter']!r} is unknown; fix: tipf or apet")
        method_params("safe", params["safe"])
        method_params(params["adapter"], params["adapter_config"])
    return params


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_type(method: str, name: str, value, default):
    """A value must have its default's shape: number, integer, string, bool, list of numbers of the
    same length, or a mapping; ranges are checked later by the method itself."""
    if default is None or name in ("train_groups",):
        ok = value is None or isinstance(value, (int, list, tuple, str))
    elif isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = _is_num(value)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple)) and len(value) == len(default) and all(_is_num(x) for x in value)
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
    else:
        ok = True
    if not ok:
        want = (f"a list of {len(default)} numbers" if isinstance(default, (list, tuple))
                else type(default).__name__)
        raise CachekitError(f"{method}.{name}={value!r} is not {want}; fix: e.g. {method}.{name}={default!r}")


def refine_channels(W, F, key_labels, top_k: int, weights=(0.5, 0.5), text_only: bool = False):
    """APE's channel selection: (indices of the top-Q channels, per-channel scores)."""
    w0, w1 = (float(w) for w in weights)
    sc = refine.scores(W, None if text_only else F, None if text_only else key_labels, w0=w0, w1=w1,
                       text_only=text_only)
    return refine.select_channels(sc, int(top_k)), sc


class ApeSearches:
    """APE searches remembered by (inputs key, channel indices in order, grid).

    Configurations whose criterion weights or Q pick the very same channels (in the same order, so the same
    arithmetic) get the very same search, so a sweep runs it once. Keeps the latest `size` searches.
    """

    def __init__(self, size: int = 512):
        self.size = size
        self._memo: dict = {}

    def __len__(self) -> int:
        return len(self._memo)

    def select(self, inputs_key, x, idx: torch.Tensor, s, n) -> tuple:
        """(ape.select on val then test for these channels, whether it was reused)."""
        key = (inputs_key, tuple(idx.tolist()), tuple(s), tuple(n))
        sel = self._memo.get(key)
        if sel is not None:
            return sel, True
        sel = ape.select(x.val_f, x.val_y, x.W, x.F, x.L, x.key_labels, idx, x.test_f, x.test_y,
                         s=tuple(s), n=tuple(n))
        if len(self._memo) >= self.size:
            self._memo.pop(next(iter(self._memo)))
        self._memo[key] = sel
        return sel, False


class Runner:
    """Runs methods on one open cache. Inputs are loaded once per (K, seed) and reused."""

    def __init__(self, cache: Cache):
        self.cache = cache
        self._inputs = lru_cache(maxsize=8)(self._load)
        self._ape_searches = ApeSearches()

    def inputs(self, k: int, seed: int) -> Inputs:
        return self._inputs(int(k), int(seed))

    def _load(self, k: int, seed: int) -> Inputs:
        c = self.cache
        F, y = c.train_keys(k, seed)
        return Inputs(W=c.text_classifier(), F=F, key_labels=y,
                      L=torch.nn.functional.one_hot(y, c.num_classes).float(),
                      val_f=c.features("val"), val_y=c.labels("val"),
                      test_f=c.features("test"), test_y=c.labels("test"))

    @property
    def selection_label(self) -> str:
        return "val (val and test are the same data)" if self.cache.val_is_test else "val"

    def run(self, method: str, k: int, seed: int, overrides: dict | None = None) -> dict:
        """One method on one few-shot set: hyper-parameters chosen on val, then test once."""
        params = method_params(method, overrides)
        x = self.inputs(k, seed)
        t0 = time.perf_counter()
        extra = {}
        if method == "zeroshot":
            sel = zeroshot.select(x.val_f, x.val_y, x.W, x.test_f, x.test_y)
        elif method == "tip":
            sel = tip.select(x.val_f, x.val_y, x.W, x.F, x.L, x.test_f, x.test_y,
                             s_beta=params["s"][0], s_alpha=params["s"][1],
                             n_beta=params["n"][0], n_alpha=params["n"][1])
        elif method == "ape":
            idx, _ = refine_channels(x.W, x.F, x.key_labels, params["top_k"], params["weights"])
            sel, reused = self._ape_searches.select((int(k), int(seed)), x, idx, params["s"], params["n"])
            if reused:
                extra = {"search": "reused: an earlier configuration selected the same channels"}
        elif method == "gda":
            from .methods import gda

            X, yv = self.cache.train_views(k, seed)
            sel = gda.select(x.val_f, x.val_y, x.W, X, yv, x.test_f, x.test_y)
        elif method == "safe":
            from .methods.safe import SafeConfig
            from .safe_run import fit_safe

            cfg = SafeConfig.from_dict({k2: v for k2, v in params.items() if k2 != "blend"})
            res = fit_safe(self.cache, k, seed, cfg, blend=params["blend"])
            sel = res["selection"]
            extra = {"trained": res["trained"], "val_acc_frozen": sel.extra["val_acc_frozen"],
                     "test_acc_frozen": sel.extra.get("test_acc_frozen"),
                     "final_train_loss": res["log"][-1]["loss"] if res["log"] else None}
        elif method in ("tipf", "apet"):
            X, yv = self.cache.train_views(k, seed)
            sel, extra = self._adapter(method, params, X, yv, x.F, x.key_labels, x.L, x.W,
                                       x.val_f, x.val_y, x.test_f, x.test_y)
        elif method == "safe-a":
            sel, extra = self._safe_a(k, seed, params, x)
        else:
            raise CachekitError(f"unknown method {method!r}; fix: one of {', '.join(DEFAULTS)}")
        return self.record(method, k, seed, params, sel, time.perf_counter() - t0, extra)

    def _adapter(self, method, params, X, yv, F, key_labels, L, W, val_f, val_y, test_f, test_y):
        """Train Tip-Adapter-F or APE-T (epoch chosen on val), then search (beta, alpha) on val."""
        from .methods import apet, tipf

        cfg = {k2: v for k2, v in params.items() if k2 not in _SEARCH_KEYS}
        s, n = tuple(params["s"]), tuple(params["n"])
        if method == "tipf":
            fit = tipf.fit(X, yv, W, F, L, val_f, val_y, tipf.TipFConfig.from_dict(cfg))
            sel = tipf.select(fit, val_f, val_y, W, L, test_f, test_y, s=s, n=n)
        else:
            idx = apet.default_channels(W, int(params["top_k"]), tuple(params["weights"]))
            fit = apet.fit(X, yv, W, F, L, key_labels, idx, val_f, val_y, apet.APETConfig.from_dict(cfg))
            sel = apet.select(fit, val_f, val_y, W, F, L, key_labels, test_f, test_y, s=s, n=n)
        return sel, {"best_epoch": fit.best_epoch, "val_acc_init": fit.val_acc_init}

    def _safe_a(self, k, seed, params, x):
        """SAFE-A: SAFE (stored fit reused) re-pools train views, val and test from the cached dense
        maps through the fine-tuned layer, blended with beta chosen on val; then the adapter."""
        from .methods.safe import SafeConfig
        from .safe_run import blended_features, fit_safe, pooled_train_views

        adapter = params["adapter"]
        sp = method_params("safe", params["safe"])
        cfg = SafeConfig.from_dict({k2: v for k2, v in sp.items() if k2 != "blend"})
        res = fit_safe(self.cache, k, seed, cfg, blend="feature")
        X, yv, keys = pooled_train_views(self.cache, k, seed, res, cfg)
        ap = method_params(adapter, params["adapter_config"])
        val_f, test_f = blended_features(res, "val"), blended_features(res, "test")
        sel, extra = self._adapter(adapter, ap, X, yv, keys, x.key_labels, x.L, x.W, val_f, x.val_y,
                                   test_f, x.test_y)
        extra.update({"safe_beta": res["selection"].params["beta"], "safe_trained": res["trained"]})
        return sel, extra

    def record(self, method, k, seed, config, sel, seconds, extra=None) -> dict:
        m = self.cache.meta
        return {
            "method": method,
            "shots": int(k),
            "seed": int(seed),
            "metrics": {"val_acc": sel.val_acc, "test_acc": sel.test_acc},
            "params": sel.params,
            "config": config,
            "selection": self.selection_label,
            "seconds": round(seconds, 4),
            "dataset": self.cache.path.stem,
            "model": m["model"],
            "pretrained": m["checkpoint"],
            "weights": m["weights"],
            "random_weights": bool(m["random_weights"]),
            "cache": str(self.cache.path),
            "cache_identity": m["dataset_fingerprint"][:16],
            "cachekit_version": __version__,
            **({"extra": extra} if extra else {}),
        }


def store_refine(cache: Cache, k: int, seed: int, top_k: int, weights=(0.5, 0.5), text_only: bool = False) -> dict:
    """Compute APE's channel selection for (K, seed) and store it in the cache's results."""
    from .results import ResultStore

    c = cache
    W = c.text_classifier()
    if not 1 <= int(top_k) <= W.shape[1]:
        raise CachekitError(f"--top-k {top_k} is out of range for D={W.shape[1]} channels; "
                            f"fix: pass 1..{W.shape[1]}")
    F, y = c.train_keys(k, seed)
    idx, sc = refine_channels(W, F, y, top_k, weights, text_only)
    variant = "text-only" if text_only else "text+cache"
    key = {"k": int(k), "seed": int(seed), "top_k": int(top_k), "weights": [float(w) for w in weights],
           "variant": variant}
    path = ResultStore(c).put("refine", key, {"channels": idx.numpy(), "scores": sc.numpy()},
                              info={"weights_label": c.weights_label})
    return {**key, "channels": idx.tolist(), "scores": sc.tolist(), "stored": str(path)}


def evaluate(cache: Cache, methods, shots=None, seeds=None, overrides: dict | None = None,
             progress: bool = False) -> list[dict]:
    """Every method on every (K, seed) of the cache (or the ones asked for)."""
    from tqdm import tqdm

    have = cache.fewshot_names()
    shots = sorted(set(shots or [k for k, _ in have]))
    seeds = sorted(set(seeds or [s for _, s in have]))
    runner = Runner(cache)
    jobs = [(m, k, s) for k in shots for s in seeds for m in methods]
    for m in methods:
        method_params(m, (overrides or {}).get(m))
    for k in shots:
        for s in seeds:
            cache.fewshot(k, s)  # a clear error before any work when a set is missing
    out = []
    for m, k, s in tqdm(jobs, desc="eval", unit="run", disable=not progress or None, leave=False):
        out.append(runner.run(m, k, s, (overrides or {}).get(m)))
    return out


def summarize(records: list[dict], metric: str = "test_acc") -> tuple[list[str], list[list[str]]]:
    """Rows: methods; columns: shots; cells: mean ± std over seeds."""
    import numpy as np

    methods = list(dict.fromkeys(r["method"] for r in records))
    shots = sorted({r["shots"] for r in records})
    rows = []
    for m in methods:
        row = [m]
        for k in shots:
            v = [r["metrics"][metric] for r in records if r["method"] == m and r["shots"] == k
                 and r["metrics"][metric] is not None]
            row.append(f"{np.mean(v):.2f} ± {np.std(v):.2f}" if v else "-")
        rows.append(row)
    return ["method"] + [f"{k}-shot" for k in shots], rows
