"""Shared pieces of every method: accuracy, first-best selection and the result record."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent, from the integer count (so equal counts give equal floats)."""
    n = int(labels.numel())
    return 100.0 * int((logits.argmax(dim=-1) == labels).sum()) / n if n else float("nan")


def correct_counts(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Number of correct predictions for a batch of logit sets: logits (..., M, C) -> (...)."""
    return (logits.argmax(dim=-1) == labels).sum(dim=-1)


def first_best(scores: torch.Tensor) -> int:
    """Flat index of the first maximum (row-major), matching a naive loop that keeps the first best."""
    flat = scores.reshape(-1)
    best = flat.max()
    return int(torch.nonzero(flat == best)[0].item())


@dataclass
class Selection:
    """Hyper-parameters chosen on val, and the accuracies they give."""

    method: str
    params: dict
    val_acc: float
    test_acc: float | None = None
    extra: dict = field(default_factory=dict)
