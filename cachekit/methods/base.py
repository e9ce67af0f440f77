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


# ------------------------------------------------------------------------------------------ the contract
class Estimator:
    """What every registered method is: built from its checked Config, `fit(task)` trains (a no-op for the
    training-free methods), `select(task)` chooses hyper-parameters on task's val data only and then scores
    task's test data once. A method reads its inputs from the task (see cachekit.task.Task) and never opens
    files or prints.

    `resolve(config, task, explicit)` (optional, a classmethod) fills in what depends on the cache before the
    run's identity is computed, e.g. APE's channel source or a Q clipped to the cache's width; it returns
    (config, notes).
    """

    def __init__(self, config):
        self.config = config

    @classmethod
    def resolve(cls, config, task, explicit: frozenset):
        return config, []

    def fit(self, task) -> "Estimator":
        return self

    def select(self, task) -> Selection:  # pragma: no cover - the contract
        raise NotImplementedError

    def extra(self) -> dict:
        """Facts of the run worth keeping in the record (chosen epoch, whether a stored fit was reused...)."""
        return {}
