"""APE-T: APE's trained variant (docs/methods-trained-adapters.md).

Trainable: a class residual R (C, Q), zero-init, added to the selected channels idx (Q of them) of the text
row w_c and of every cache key of class c; per-entry value weights v (N,), ones-init.

    W~[c]      = w_c  with  W~[c, idx] += R[c]            then row-L2-normalised (normalize=True)
    F~[n]      = F[n] with  F~[n, idx] += R[key_labels[n]] then row-L2-normalised (normalize=True)
    logits     = 100 f W~^T + alpha * exp(-beta (1 - f F~^T)) (L * v[:, None])

f is the full-dimension feature; there is no KL term. Training: cross-entropy on augmented train views,
AdamW(lr 1e-3, eps 1e-3, weight decay 0.1), cosine schedule per iteration, with the fixed initial
(alpha, beta); the epoch is chosen on **val** (first best); then (beta, alpha) is searched on val with
tip.select on (W~, F~, L * v) and test is evaluated once.

Pure tensor functions: no files, no printing; progress goes through an optional callback.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import CachekitError
from . import ape, refine, tip
from ..params import param
from .grids import MAX_GRID_POINTS
from .base import Estimator, Selection
from .registry import register
from .tipf import AdapterConfig
from .training import check_inputs, train_loop

#: (w0, w1) of the text-only channel criterion used by APE-T (authors' configs: w_training).
DEFAULT_WEIGHTS = (0.2, 0.8)


@dataclass
class APETConfig(AdapterConfig):
    """APE-T settings (defaults: the released configs; see docs/methods-trained-adapters.md)."""

    OWNER = "apet"
    eps: float = param(1e-3, "float", "AdamW eps", gt=0)
    weight_decay: float = param(0.1, "float", "AdamW weight decay", ge=0)
    normalize: bool = param(True, "bool", "re-L2-normalise W~ and F~ rows after adding the residual "
                            "(the released code does not)")
    top_k: int = param(500, "int", "Q, channels the residual lives on (clipped to the cache's width, with a note)",
                       ge=1)
    weights: tuple = param(DEFAULT_WEIGHTS, "floats", "(w0, w1) of the text-only criterion", length=2)
    channels: str = param("auto", "str", "channel source, as for ape (stored refinements: `refine --text-only`)",
                          choices=ape.CHANNEL_SOURCES)
    s: tuple = param((7, 7), "floats", "search scales (s_beta, s_alpha) after training", length=2, gt=0,
                     search=True)
    n: tuple = param((200, 20), "ints", "search steps (n_beta, n_alpha)", length=2, ge=1, search=True,
                     max_points=MAX_GRID_POINTS)

def default_channels(W: torch.Tensor, q: int, weights: tuple = DEFAULT_WEIGHTS) -> torch.Tensor:
    """APE-T's channels: the top-q of refine's text-only criterion J = -w0 sim + w1 var, (w0, w1) = weights."""
    if len(weights) != 2:
        raise CachekitError(f"weights={weights!r} must be (w0, w1); fix: pass two numbers, e.g. (0.2, 0.8)")
    w0, w1 = (float(w) for w in weights)
    return refine.select_channels(refine.scores(W, None, None, w0=w0, w1=w1, text_only=True), q)


def _check_idx(idx: torch.Tensor, D: int) -> torch.Tensor:
    idx = torch.as_tensor(idx)
    if idx.dim() != 1 or idx.numel() == 0 or idx.is_floating_point():
        raise CachekitError(f"channel indices have shape {tuple(idx.shape)} / {idx.dtype}; "
                            "fix: pass a 1-d integer tensor (e.g. default_channels(W, q))")
    idx = idx.long()
    if int(idx.min()) < 0 or int(idx.max()) >= D or torch.unique(idx).numel() != idx.numel():
        raise CachekitError(f"channel indices must be distinct and lie in 0..{D - 1}; "
                            "fix: pass default_channels(W, q) or refine.select_channels(...)")
    return idx


def _check_keys(L: torch.Tensor, key_labels, C: int) -> torch.Tensor:
    y = torch.as_tensor(key_labels)
    if y.dim() != 1 or y.numel() != L.shape[0] or y.is_floating_point():
        raise CachekitError(f"key labels have shape {tuple(y.shape)}, expected ({L.shape[0]},) integers; "
                            "fix: pass one class id per cache key")
    return ape.check_one_hot(L, y.long().to(L.device), C)


def adapted(W: torch.Tensor, F: torch.Tensor, L: torch.Tensor, key_labels: torch.Tensor, idx: torch.Tensor,
            residual: torch.Tensor, values: torch.Tensor, normalize: bool = True):
    """(W~ (C, D), F~ (N, D), V (N, C)): the adapted text rows, keys and values (differentiable)."""
    idx = idx.to(W.device).long()
    y = key_labels.to(W.device).long()
    W_t = W.index_add(1, idx, residual)  # W~[c, idx[q]] = W[c, idx[q]] + R[c, q]
    F_t = F.index_add(1, idx, residual[y])
    if normalize:
        W_t = W_t / W_t.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        F_t = F_t / F_t.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return W_t, F_t, L * values.unsqueeze(1)


def logits(f: torch.Tensor, W: torch.Tensor, F: torch.Tensor, L: torch.Tensor, key_labels: torch.Tensor,
           idx: torch.Tensor, residual: torch.Tensor, values: torch.Tensor, alpha: float, beta: float,
           normalize: bool = True) -> torch.Tensor:
    """APE-T logits (M, C) = 100 f W~^T + alpha * exp(-beta (1 - f F~^T)) (L * v)."""
    W_t, F_t, V = adapted(W, F, L, key_labels, idx, residual, values, normalize)
    return tip.logits(f, W_t, F_t, V, alpha, beta)


@dataclass
class APETFit:
    """Result of `fit`: residual (C, Q) and values (N,) of the first best val epoch (CPU), that epoch, log."""

    residual: torch.Tensor
    values: torch.Tensor
    best_epoch: int
    log: list = field(default_factory=list)
    idx: torch.Tensor | None = None  # the channels the residual lives on
    val_acc_init: float | None = None  # val accuracy before training (= Tip-Adapter at the init alpha, beta)
    config: APETConfig = field(default_factory=APETConfig)


def fit(X: torch.Tensor, y, W: torch.Tensor, F: torch.Tensor, L: torch.Tensor, key_labels, idx,
        val_f: torch.Tensor, val_y, config: APETConfig | None = None,
        callback: Callable[[dict], None] | None = None) -> APETFit:
    """Train the class residual and the value weights on augmented train views X (R, D), labels y (R,).

    W (C, D), F (N, D) normalised keys, L (N, C) one-hot of key_labels (N,), idx (Q,) channels
    (e.g. default_channels(W, Q)); val_f, val_y pick the epoch. callback(entry) after every epoch.
    """
    config = APETConfig() if config is None else config
    config.validate()
    y_t, vy = check_inputs(X, y, W, F, L, val_f, val_y)
    C, D = W.shape
    idx = _check_idx(idx, D)
    ky = _check_keys(L, key_labels, C)
    dev = torch.device(config.device)
    dt = F.dtype
    Xd, Wd, Fd, Ld = X.to(dev, dt), W.to(dev, dt), F.to(dev, dt), L.to(dev, dt)
    vf, vy, y_t, ky_d, idx_d = val_f.to(dev, dt), vy.to(dev), y_t.to(dev), ky.to(dev), idx.to(dev)
    residual = torch.nn.Parameter(torch.zeros(C, idx.numel(), dtype=dt, device=dev))
    values = torch.nn.Parameter(torch.ones(Fd.shape[0], dtype=dt, device=dev))
    alpha, beta, norm = float(config.init_alpha), float(config.init_beta), bool(config.normalize)

    def batch_logits(rows):
        return logits(Xd[rows], Wd, Fd, Ld, ky_d, idx_d, residual, values, alpha, beta, norm)

    def val_correct():
        out = logits(vf, Wd, Fd, Ld, ky_d, idx_d, residual.detach(), values.detach(), alpha, beta, norm)
        return int((out.argmax(dim=-1) == vy).sum())

    best, best_epoch, log, val_init = train_loop(
        [residual, values], batch_logits, y_t, val_correct, int(vy.numel()),
        lambda: (residual.detach().cpu().clone(), values.detach().cpu().clone()), config, callback)
    return APETFit(residual=best[0], values=best[1], best_epoch=best_epoch, log=log, idx=idx.cpu().clone(),
                   val_acc_init=val_init, config=config)


def select(fit_result: APETFit, val_f: torch.Tensor, val_y, W: torch.Tensor, F: torch.Tensor, L: torch.Tensor,
           key_labels, test_f: torch.Tensor | None = None, test_y=None, s: tuple = (7, 7),
           n: tuple = (200, 20)) -> Selection:
    """Search (beta, alpha) on val with the trained W~, F~ and values L * v (tip.select's exact vectorised
    grid, beta outer, alpha inner, first best), then evaluate test once. The epoch was fixed on val by fit."""
    if not isinstance(fit_result, APETFit):
        raise CachekitError("select needs the APETFit returned by apet.fit; fix: pass fit(...)'s result")
    if len(s) != 2 or len(n) != 2:
        raise CachekitError(f"s={s!r}, n={n!r}: expected (s_beta, s_alpha) and (n_beta, n_alpha); "
                            "fix: pass two values each")
    C, D = W.shape
    ky = _check_keys(L, key_labels, C)
    idx = _check_idx(fit_result.idx, D)
    dev, dt = val_f.device, val_f.dtype
    with torch.no_grad():
        W_t, F_t, V = adapted(W, F, L, ky, idx, fit_result.residual.to(dev, dt), fit_result.values.to(dev, dt),
                              fit_result.config.normalize)
    # tip.select evaluates zeroshot.logits(f, W~) + alpha * cache_logits(f F~^T, V, beta): the same
    # operations as `logits`, so its choice and accuracies are those of the APE-T logits (any value matrix).
    sel = tip.select(val_f, torch.as_tensor(val_y).long(), W_t, F_t, V, test_f=test_f,
                     test_y=None if test_y is None else torch.as_tensor(test_y).long(),
                     s_beta=s[0], s_alpha=s[1], n_beta=int(n[0]), n_alpha=int(n[1]))
    params = {"beta": sel.params["beta"], "alpha": sel.params["alpha"], "epoch": fit_result.best_epoch}
    extra = dict(sel.extra)
    extra.update({"epoch_val_acc": [e["val_acc"] for e in fit_result.log],
                  "val_acc_init": fit_result.val_acc_init, "channels": int(idx.numel()),
                  "normalize": fit_result.config.normalize,
                  "init": {"alpha": fit_result.config.init_alpha, "beta": fit_result.config.init_beta}})
    return Selection(method="apet", params=params, val_acc=sel.val_acc, test_acc=sel.test_acc, extra=extra)



# ----------------------------------------------------------------------------------------------- estimator
class APET(Estimator):
    """Channels (stored or by the text-only criterion), training (epoch on val), then (beta, alpha) on val."""

    @classmethod
    def resolve(cls, config, task, explicit):
        return refine.resolve_channels(config, task, explicit, "text-only")

    def fit(self, task) -> "APET":
        idx, self.source = refine.channels_for(self.config, task, "text-only")
        X, y = task.train_views()
        self.result = fit(X, y, task.W, task.F, task.L, task.key_labels, idx, task.val_f, task.val_y, self.config)
        return self

    def select(self, task) -> Selection:
        return select(self.result, task.val_f, task.val_y, task.W, task.F, task.L, task.key_labels, task.test_f,
                      task.test_y, s=self.config.s, n=self.config.n)

    def extra(self) -> dict:
        return {"best_epoch": self.result.best_epoch, "val_acc_init": self.result.val_acc_init,
                "channels": self.source}


register("apet", config=APETConfig, estimator=APET, trained=True, doc="docs/methods-trained-adapters.md",
         summary="APE-T: class residual on refined channels and entry weights trained, (β, α) on val")
