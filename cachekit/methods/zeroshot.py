"""Zero-shot CLIP on cached features: logits = 100 * f @ W.T (fixed scale 100)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..params import Config
from .base import Estimator, Selection, accuracy
from .registry import register

#: Fixed zero-shot logit scale (not CLIP's learned logit_scale).
SCALE = 100.0


def logits(f: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """f (M, D) L2-normalised features, W (C, D) L2-normalised text rows -> (M, C) = 100 * f @ W.T."""
    return SCALE * (f @ W.t())


def select(val_f: torch.Tensor, val_y: torch.Tensor, W: torch.Tensor,
           test_f: torch.Tensor | None = None, test_y: torch.Tensor | None = None) -> Selection:
    """No hyper-parameters: report val accuracy, and test accuracy when test is given."""
    val_acc = accuracy(logits(val_f, W), val_y)
    test_acc = None
    if test_f is not None and test_y is not None:
        test_acc = accuracy(logits(test_f, W), test_y)
    return Selection(method="zeroshot", params={}, val_acc=val_acc, test_acc=test_acc)


# ----------------------------------------------------------------------------------------------- registration


@dataclass
class ZeroShotConfig(Config):
    """Zero-shot CLIP has no settings."""

    OWNER = "zeroshot"


class ZeroShot(Estimator):
    def select(self, task) -> Selection:
        return select(task.val_f, task.val_y, task.W, task.test_f, task.test_y)


register("zeroshot", config=ZeroShotConfig, estimator=ZeroShot, doc="docs/methods-training-free.md",
         summary="CLIP's text classifier: 100 f·Wᵀ")
