"""Tip-Adapter-F: Tip-Adapter whose cache keys are trained (docs/methods-trained-adapters.md).

    logits = 100 f W^T + alpha * exp(-beta (1 - f K^T)) L

K (N, D) is trainable, initialised from the cache keys F and never re-normalised; W, L and the features
are frozen. Training: cross-entropy on augmented train views, AdamW, cosine schedule per iteration, with
the fixed initial (alpha, beta). After each epoch the keys are scored on **val** (never test) with the
initial (alpha, beta); the first best epoch is kept. Then (beta, alpha) is re-searched on val with
`tip.select` and test is evaluated once.

Pure tensor functions: no files, no printing; progress goes through an optional callback.
The training loop shared with APE-T (`train_loop`, `cosine_lr`, `check_inputs`) lives in `training.py`;
the settings are declared once in `AdapterConfig` (checked by cachekit.params).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import CachekitError
from ..params import Config, param
from . import tip, zeroshot
from .grids import MAX_GRID_POINTS
from .base import Estimator, Selection
from .registry import register
from .training import check_inputs, train_loop


# ----------------------------------------------------------------------------------------------- config
@dataclass
class AdapterConfig(Config):
    """The training settings Tip-F and APE-T share (one declaration; subclasses change defaults)."""

    epochs: int = param(20, "int", "training epochs (the best val epoch is kept)", ge=1)
    lr: float = param(1e-3, "float", "AdamW learning rate (cosine schedule per iteration)", ge=0)
    eps: float = param(1e-4, "float", "AdamW eps", gt=0)
    weight_decay: float = param(0.01, "float", "AdamW weight decay", ge=0)
    batch_size: int = param(256, "int", "train views per step", ge=1)
    epoch_size: int | None = param(None, "int", "train views drawn per epoch; null: every view once",
                                   ge=1, optional=True)
    init_alpha: float = param(1.0, "float", "alpha used while training", ge=0)
    init_beta: float = param(1.0, "float", "beta used while training", ge=0)
    seed: int = param(1, "int", "seed of the shuffling")
    device: str = param("cpu", "device", "device the adapter trains on (eval/sweep --device sets it)")



# ----------------------------------------------------------------------------------------------- config
@dataclass
class TipFConfig(AdapterConfig):
    """Tip-Adapter-F settings (defaults: the released code; see docs/methods-trained-adapters.md).

    weight_decay 0.01 is torch's AdamW default, which the released code uses implicitly (it passes none).
    """

    OWNER = "tipf"
    s: tuple = param((7, 7), "floats", "search scales (s_beta, s_alpha) after training", length=2, gt=0,
                     search=True)
    n: tuple = param((200, 20), "ints", "search steps (n_beta, n_alpha)", length=2, ge=1, search=True,
                     max_points=MAX_GRID_POINTS)

@dataclass
class TipFFit:
    """Result of `fit`: trained keys (N, D, CPU) of the best val epoch, that epoch (1-based), per-epoch log."""

    keys: torch.Tensor
    best_epoch: int
    log: list = field(default_factory=list)
    val_acc_init: float | None = None  # val accuracy of the untrained keys at the init (alpha, beta)
    config: TipFConfig = field(default_factory=TipFConfig)


def logits(f: torch.Tensor, W: torch.Tensor, keys: torch.Tensor, L: torch.Tensor,
           alpha: float, beta: float) -> torch.Tensor:
    """Tip-Adapter-F logits: 100 f W^T + alpha * exp(-beta (1 - f keys^T)) L (keys not re-normalised)."""
    return tip.logits(f, W, keys, L, alpha, beta)


def fit(X: torch.Tensor, y, W: torch.Tensor, F: torch.Tensor, L: torch.Tensor, val_f: torch.Tensor, val_y,
        config: TipFConfig | None = None, callback: Callable[[dict], None] | None = None) -> TipFFit:
    """Train the cache keys on augmented train views X (R, D) with labels y (R,).

    W (C, D) text classifier, F (N, D) initial keys, L (N, C) values (frozen); val_f, val_y pick the epoch.
    callback(entry) is called after every epoch with {"epoch", "loss", "train_acc", "val_acc", "lr"}.
    """
    config = TipFConfig() if config is None else config
    config.validate()
    y_t, vy = check_inputs(X, y, W, F, L, val_f, val_y)
    dev = torch.device(config.device)
    dt = F.dtype
    Xd, Wd, Ld = X.to(dev, dt), W.to(dev, dt), L.to(dev, dt)
    vf, vy = val_f.to(dev, dt), vy.to(dev)
    y_t = y_t.to(dev)
    keys = torch.nn.Parameter(F.detach().to(dev).clone())
    alpha, beta = float(config.init_alpha), float(config.init_beta)
    z_train = zeroshot.logits(Xd, Wd)  # frozen part, computed once

    def batch_logits(rows):
        xb = Xd[rows]
        return z_train[rows] + alpha * tip.cache_logits(xb @ keys.t(), Ld, beta)

    def val_correct():
        return int((logits(vf, Wd, keys.detach(), Ld, alpha, beta).argmax(dim=-1) == vy).sum())

    best, best_epoch, log, val_init = train_loop(
        [keys], batch_logits, y_t, val_correct, int(vy.numel()),
        lambda: keys.detach().cpu().clone(), config, callback)
    return TipFFit(keys=best, best_epoch=best_epoch, log=log, val_acc_init=val_init, config=config)


def select(fit_result: TipFFit, val_f: torch.Tensor, val_y, W: torch.Tensor, L: torch.Tensor,
           test_f: torch.Tensor | None = None, test_y=None, s: tuple = (7, 7), n: tuple = (200, 20)) -> Selection:
    """Re-search (beta, alpha) on val with the trained keys (tip.select's grid, beta outer, first best),
    then evaluate test once. The epoch was already fixed on val by `fit`."""
    if not isinstance(fit_result, TipFFit):
        raise CachekitError("select needs the TipFFit returned by tipf.fit; fix: pass fit(...)'s result")
    if len(s) != 2 or len(n) != 2:
        raise CachekitError(f"s={s!r}, n={n!r}: expected (s_beta, s_alpha) and (n_beta, n_alpha); "
                            "fix: pass two values each")
    keys = fit_result.keys.to(device=val_f.device, dtype=val_f.dtype)
    sel = tip.select(val_f, torch.as_tensor(val_y).long(), W, keys, L, test_f=test_f,
                     test_y=None if test_y is None else torch.as_tensor(test_y).long(),
                     s_beta=s[0], s_alpha=s[1], n_beta=int(n[0]), n_alpha=int(n[1]))
    params = {"beta": sel.params["beta"], "alpha": sel.params["alpha"], "epoch": fit_result.best_epoch}
    extra = dict(sel.extra)
    extra.update({"epoch_val_acc": [e["val_acc"] for e in fit_result.log],
                  "val_acc_init": fit_result.val_acc_init,
                  "init": {"alpha": fit_result.config.init_alpha, "beta": fit_result.config.init_beta}})
    return Selection(method="tipf", params=params, val_acc=sel.val_acc, test_acc=sel.test_acc, extra=extra)


# ----------------------------------------------------------------------------------------------- estimator
class TipF(Estimator):
    """Train the keys on the augmented views (epoch chosen on val), then search (beta, alpha) on val."""

    def fit(self, task) -> "TipF":
        X, y = task.train_views()
        self.result = fit(X, y, task.W, task.F, task.L, task.val_f, task.val_y, self.config)
        return self

    def select(self, task) -> Selection:
        return select(self.result, task.val_f, task.val_y, task.W, task.L, task.test_f, task.test_y,
                      s=self.config.s, n=self.config.n)

    def extra(self) -> dict:
        return {"best_epoch": self.result.best_epoch, "val_acc_init": self.result.val_acc_init}


register("tipf", config=TipFConfig, estimator=TipF, trained=True, doc="docs/methods-trained-adapters.md",
         summary="Tip-Adapter-F: cache keys trained, epoch and (β, α) on val")
