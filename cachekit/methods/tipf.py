"""Tip-Adapter-F: Tip-Adapter whose cache keys are trained (docs/methods-trained-adapters.md).

    logits = 100 f W^T + alpha * exp(-beta (1 - f K^T)) L

K (N, D) is trainable, initialised from the cache keys F and never re-normalised; W, L and the features
are frozen. Training: cross-entropy on augmented train views, AdamW, cosine schedule per iteration, with
the fixed initial (alpha, beta). After each epoch the keys are scored on **val** (never test) with the
initial (alpha, beta); the first best epoch is kept. Then (beta, alpha) is re-searched on val with
`tip.select` and test is evaluated once.

Pure tensor functions: no files, no printing; progress goes through an optional callback.
The training loop shared with APE-T (`train_loop`, `cosine_lr`, `check_inputs`) lives in `training.py`;
this module still holds the config checks.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Mapping

import numpy as np
import torch

from ..errors import CachekitError
from . import tip, zeroshot
from .base import Selection
from .training import check_inputs, train_loop
from .training import cosine_lr  # noqa: F401  re-export (moved to training.py)


# ----------------------------------------------------------------------------------------------- checks
def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) \
        and math.isfinite(float(v))


def check_common(cfg, what: str) -> None:
    """Checks shared by the Tip-F and APE-T configs; raises CachekitError naming the field and the fix."""

    def bad(name, why):
        raise CachekitError(f"{what} setting {name}={getattr(cfg, name)!r} is invalid; fix: {why}")

    if not _is_int(cfg.epochs) or cfg.epochs < 1:
        bad("epochs", "use an integer >= 1")
    if not _is_num(cfg.lr) or cfg.lr < 0:
        bad("lr", "use a number >= 0, e.g. 1e-3")
    if not _is_num(cfg.eps) or cfg.eps <= 0:
        bad("eps", "use a positive number, e.g. 1e-4")
    if not _is_num(cfg.weight_decay) or cfg.weight_decay < 0:
        bad("weight_decay", "use a number >= 0")
    if not _is_int(cfg.batch_size) or cfg.batch_size < 1:
        bad("batch_size", "use an integer >= 1")
    if cfg.epoch_size is not None and (not _is_int(cfg.epoch_size) or cfg.epoch_size < 1):
        bad("epoch_size", "use an integer >= 1, or None for every train view each epoch")
    if not _is_num(cfg.init_alpha) or cfg.init_alpha < 0:
        bad("init_alpha", "use a number >= 0, e.g. 1")
    if not _is_num(cfg.init_beta) or cfg.init_beta < 0:
        bad("init_beta", "use a number >= 0, e.g. 1")
    if not _is_int(cfg.seed):
        bad("seed", "use an integer")
    if not isinstance(cfg.device, str):
        bad("device", "use a torch device string such as 'cpu' or 'cuda'")
    try:
        torch.device(cfg.device)
    except (RuntimeError, TypeError):
        bad("device", "use a torch device string such as 'cpu' or 'cuda'")


def config_from_dict(cls, d: Mapping, what: str):
    if not isinstance(d, Mapping):
        raise CachekitError(f"{what} settings must be a mapping, got {type(d).__name__}; fix: pass a dict")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise CachekitError(f"unknown {what} setting(s) {', '.join(map(str, unknown))}; "
                            f"fix: use only {', '.join(sorted(known))}")
    cfg = cls(**dict(d))
    cfg.validate()
    return cfg


class AdapterConfig:
    """What the Tip-F and APE-T config dataclasses share; a subclass names itself in LABEL (messages)."""

    LABEL = "adapter"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping):
        return config_from_dict(cls, d, cls.LABEL)

    def validate(self):
        check_common(self, self.LABEL)
        return self


# ----------------------------------------------------------------------------------------------- config
@dataclass
class TipFConfig(AdapterConfig):
    """Tip-Adapter-F training settings (defaults: the released code; see docs/methods-trained-adapters.md).

    weight_decay 0.01 is torch's AdamW default, which the released code uses implicitly (it passes none).
    epoch_size: train views drawn (without replacement) per epoch; None = every row of X once per epoch.
    """

    epochs: int = 20
    lr: float = 1e-3
    eps: float = 1e-4
    weight_decay: float = 0.01
    batch_size: int = 256
    epoch_size: int | None = None
    init_alpha: float = 1.0
    init_beta: float = 1.0
    seed: int = 1
    device: str = "cpu"

    LABEL = "Tip-Adapter-F"


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
