"""GDA (Gaussian discriminant analysis, training-free) on every augmented view of the few-shot set.

    mu_c  = mean of the features of class c
    S     = sum over all n views of (x - mu_y)(x - mu_y)^T      (scatter of class-centred features)
    Sigma = S / (n - 1)                                          (unbiased, ddof = 1; shared by all classes)
    P     = D * pinv((n - 1) Sigma + tr(Sigma) I) = D * pinv(S + tr(Sigma) I)
    W_c   = P mu_c,   b_c = log(1/C) - mu_c^T P mu_c / 2
    logits = 100 f W_text^T + alpha * (f W_gda^T + b),   alpha in {1e-4, ..., 1e2} chosen on val.

Fitting and scoring are both in float64, whatever the features' dtype: f W_gda^T and b are large and nearly
equal across classes when the class means nearly coincide (P is about D / tr(Sigma) along the mean), so their
difference, which decides the argmax, is lost to cancellation in float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import math

import torch

from ..errors import CachekitError
from . import zeroshot
from ..params import Config
from .base import Estimator, Selection, accuracy, correct_counts, first_best
from .grids import gda_alpha_grid
from .registry import register


def fit(X: torch.Tensor, y: torch.Tensor, num_classes: int,
        dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_gda (C, D), b (C,)) from features X (n, D), each view L2-normalised, and labels y (n,).

    Computed in float64 and returned in `dtype` (default: X's dtype). Pass dtype=torch.float64 to score
    without loss (`select` does): rounding W_gda and b to float32 already moves the nearly equal class scores
    by more than their difference. Every class needs at least one view.
    """
    if X.dim() != 2:
        raise CachekitError(f"GDA features have shape {tuple(X.shape)}; fix: pass X as (n_views, D)")
    y = y.reshape(-1).long().to(X.device)
    n, D = X.shape
    C = int(num_classes)
    if y.numel() != n:
        raise CachekitError(f"GDA got {y.numel()} labels for {n} features; fix: pass one label per view")
    if n < 2:
        raise CachekitError(f"GDA needs at least 2 feature vectors, got {n}; fix: use more shots or views")
    if int(y.min()) < 0 or int(y.max()) >= C:
        raise CachekitError(f"GDA labels must lie in 0..{C - 1}; fix: pass 0-based labels matching W")
    counts = torch.bincount(y, minlength=C)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten()[:5].tolist()
        raise CachekitError(f"GDA: classes {missing} have no training features; "
                            "fix: give every class at least one shot")
    Xd = X.double()
    mu = torch.zeros(C, D, dtype=torch.float64, device=X.device).index_add_(0, y, Xd)
    mu /= counts.unsqueeze(1).double()
    centred = Xd - mu[y]
    S = centred.t() @ centred  # (n - 1) * Sigma
    trace_sigma = torch.diagonal(S).sum() / (n - 1)
    P = D * torch.linalg.pinv(S + trace_sigma * torch.eye(D, dtype=torch.float64, device=X.device),
                              hermitian=True)
    W = mu @ P  # rows P mu_c (P is symmetric)
    b = math.log(1.0 / C) - 0.5 * (W * mu).sum(dim=1)
    out = X.dtype if dtype is None else dtype
    return W.to(out), b.to(out)


def discriminant(f: torch.Tensor, W_gda: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The GDA term f W_gda^T + b (M, C), computed in float64 (returned in float64)."""
    return f.double() @ W_gda.double().t() + b.double()


def logits(f: torch.Tensor, W: torch.Tensor, W_gda: torch.Tensor, b: torch.Tensor,
           alpha: float) -> torch.Tensor:
    """100 f W^T + alpha * (f W_gda^T + b), shape (M, C), computed and returned in float64.

    Pass W_gda and b from `fit(..., dtype=torch.float64)`: float64 arithmetic on rounded float32
    parameters does not recover what the rounding lost.
    """
    return zeroshot.logits(f.double(), W.double()) + alpha * discriminant(f, W_gda, b)


def select(val_f: torch.Tensor, val_y: torch.Tensor, W: torch.Tensor, X: torch.Tensor, y: torch.Tensor,
           test_f: torch.Tensor | None = None, test_y: torch.Tensor | None = None) -> Selection:
    """Fit on (X, y), choose alpha on val (first best in the order 1e-4, 1e-3, ..., 1e2), apply to test."""
    W_gda, b = fit(X, y, W.shape[0], dtype=torch.float64)
    alphas = gda_alpha_grid()
    z = zeroshot.logits(val_f.double(), W.double())  # every term and the sum in float64 (module docstring)
    g = discriminant(val_f, W_gda, b)
    yv = val_y.reshape(-1).long().to(val_f.device)
    counts = torch.stack([correct_counts(z + a * g, yv) for a in alphas]).cpu()
    j = first_best(counts)
    alpha = alphas[j]
    val_acc = float(counts[j].item()) * 100.0 / yv.numel()
    test_acc = None
    if test_f is not None and test_y is not None:
        test_acc = accuracy(logits(test_f, W, W_gda, b, alpha), test_y)
    extra = {"grid_index": j, "grid": alphas, "ties": int((counts == counts[j]).sum().item())}
    return Selection(method="gda", params={"alpha": alpha}, val_acc=val_acc, test_acc=test_acc, extra=extra)


# ----------------------------------------------------------------------------------------------- registration


@dataclass
class GDAConfig(Config):
    """GDA has no settings: its alpha grid is fixed (docs/methods-training-free.md)."""

    OWNER = "gda"


class GDA(Estimator):
    def select(self, task) -> Selection:
        X, y = task.train_views()
        return select(task.val_f, task.val_y, task.W, X, y, task.test_f, task.test_y)


register("gda", config=GDAConfig, estimator=GDA, doc="docs/methods-training-free.md",
         summary="Gaussian discriminant analysis on every augmented view, α on val")
