"""SAFE on a cache: train the attention-pooling layer on cached dense maps, blend, store.

No backbone runs here: the train views, val and test are re-pooled from the cached dense maps.
"""
from __future__ import annotations

import time

import torch

from .cache import Cache
from .errors import CachekitError
from .methods import safe
from .results import ResultStore

DEFAULT_MAX_MEMORY = 4 << 30  # bytes of float32 dense maps held in memory; above it, stream from HDF5


def safe_key(k: int, seed: int, config: safe.SafeConfig) -> dict:
    cfg = config.to_dict()
    cfg.pop("device", None)  # where it ran does not change what it means
    return {"k": int(k), "seed": int(seed), "config": cfg}


def train_source(cache: Cache, k: int, seed: int, max_memory: int = DEFAULT_MAX_MEMORY):
    """Dense maps of every augmented view of the few-shot images (the plain view if there are none)."""
    rows = cache.fewshot(k, seed)
    views = tuple(range(1, cache.views + 1)) or (0,)
    src = cache.dense_source("train", rows, views)
    labels = cache.train_labels(k, seed).repeat(len(views))
    return _maybe_in_memory(src, max_memory), labels


def _maybe_in_memory(src, max_memory):
    return safe.TensorSource(src.load()) if src.nbytes <= max_memory else src


def fit_safe(cache: Cache, k: int, seed: int, config: safe.SafeConfig | None = None, blend: str = "feature",
             max_memory: int = DEFAULT_MAX_MEMORY, reuse: bool = True, out=None, progress: bool = False) -> dict:
    """Fine-tune (or reuse a stored fit), choose the blend on val, report test, store the layer."""
    from tqdm import tqdm

    config = config or safe.SafeConfig()
    config.validate()
    if blend not in safe.BLEND_MODES:
        raise CachekitError(f"--blend {blend} is unknown; fix: one of {', '.join(safe.BLEND_MODES)}")
    store = ResultStore(cache)
    key = safe_key(k, seed, config)
    W = cache.text_classifier()
    params0, heads = cache.attnpool_params()
    val_src = _maybe_in_memory(cache.dense_source("val"), max_memory)
    val_y = cache.labels("val")
    t0 = time.perf_counter()
    stored = store.get("safe", key) if reuse and out is None else None
    if stored is not None:
        params = {n[len("params/"):]: torch.from_numpy(a) for n, a in stored["arrays"].items()
                  if n.startswith("params/")}
        log, trained = stored["attrs"]["info"]["log"], False
    else:
        src, labels = train_source(cache, k, seed, max_memory)
        bar = tqdm(total=config.epochs, desc=f"SAFE K={k} seed={seed}", unit="epoch",
                   disable=not progress or None, leave=False)

        def cb(entry):
            bar.update(1)
            bar.set_postfix(loss=f"{entry['loss']:.3f}", val=entry.get("val_acc"))

        fit = safe.fit(src, labels, W, params0, heads, config, val=(val_src, val_y), callback=cb)
        bar.close()
        params, log, trained = fit.params, fit.log, True
    seconds_fit = time.perf_counter() - t0

    pool = lambda s, p: safe.pool(s, p, heads, device=config.device)  # noqa: E731
    f_ft_val, f_orig_val = pool(val_src, params), cache.features("val")
    if cache.val_is_test:
        f_ft_test, f_orig_test = f_ft_val, f_orig_val
    else:
        f_ft_test = pool(_maybe_in_memory(cache.dense_source("test"), max_memory), params)
        f_orig_test = cache.features("test")
    sel = safe.select_blend(f_ft_val, f_orig_val, val_y, W, mode=blend, test_f_ft=f_ft_test,
                            test_f_orig=f_orig_test, test_y=cache.labels("test"))
    info = {"log": log, "blend": sel.params, "val_acc": sel.val_acc, "test_acc": sel.test_acc,
            "val_acc_frozen": sel.extra["val_acc_frozen"], "test_acc_frozen": sel.extra.get("test_acc_frozen"),
            "weights_label": cache.weights_label, "heads": heads}
    path = None
    if trained:
        arrays = {f"params/{n}": t.detach().cpu().numpy() for n, t in params.items()}
        path = store.put("safe", key, arrays, info=info, path=out)
    return {"key": key, "selection": sel, "log": log, "trained": trained, "stored": str(path) if path else None,
            "seconds": time.perf_counter() - t0, "seconds_fit": seconds_fit, "params": params,
            "features": {"val": (f_ft_val, f_orig_val), "test": (f_ft_test, f_orig_test)}}


def blended_features(res: dict, split: str) -> torch.Tensor:
    """SAFE features of a split with the blend chosen on val (feature blending)."""
    f_ft, f_orig = res["features"][split]
    beta = res["selection"].params["beta"]
    return safe.blend_features(f_ft, f_orig, beta)


def pooled_train_views(cache: Cache, k: int, seed: int, res: dict, config: safe.SafeConfig,
                       max_memory: int = DEFAULT_MAX_MEMORY) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SAFE-A inputs: the few-shot train views re-pooled through the fine-tuned layer and blended
    with the stored original features. Returns (X (V·N, D) per-view normalised, y, keys (N, D))."""
    src, labels = train_source(cache, k, seed, max_memory)
    heads = cache.attnpool_params()[1]
    f_ft = safe.pool(src, res["params"], heads, device=config.device)
    rows = torch.from_numpy(cache.fewshot(k, seed))
    views = list(range(1, cache.views + 1)) or [0]
    raw = cache.pooled("train")[views][:, rows]  # (V, N, D)
    f_orig = torch.nn.functional.normalize(raw.reshape(-1, raw.shape[-1]), dim=-1)
    X = safe.blend_features(f_ft, f_orig, res["selection"].params["beta"])
    n = len(rows)
    keys = torch.nn.functional.normalize(X.reshape(len(views), n, -1).mean(dim=0), dim=-1)
    return X, labels, keys
