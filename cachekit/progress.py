"""Progress as a callback: the library reports, the CLI renders (cli/progress_view.py).

Long library functions take `progress: Progress | None`. They call `progress(Step(...))` as work advances;
they never print. `None` means nobody listens. A Step with `done == total` closes its task.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

__all__ = ["Step", "Progress", "tick", "Counter"]


@dataclass(frozen=True)
class Step:
    """One progress report: `task` (e.g. "extract", "eval", "SAFE K=16 seed=1"), units done of `total`."""

    task: str
    done: int
    total: int | None = None
    unit: str = "it"
    info: dict = field(default_factory=dict)  # short key/value postfix, e.g. {"loss": "0.412"}


Progress = Callable[[Step], None]


def tick(progress: Progress | None, task: str, done: int, total: int | None = None, unit: str = "it",
         **info) -> None:
    """Report one step if anybody listens."""
    if progress is not None:
        progress(Step(task, int(done), None if total is None else int(total), unit, info))


class Counter:
    """A task whose units arrive one at a time: `c.advance(n=1, **info)`; `c.close()` ends it."""

    def __init__(self, progress: Progress | None, task: str, total: int | None = None, unit: str = "it",
                 initial: int = 0):
        self.progress, self.task, self.total, self.unit, self.done = progress, task, total, unit, int(initial)
        tick(progress, task, self.done, total, unit)

    def advance(self, n: int = 1, **info) -> None:
        self.done += int(n)
        tick(self.progress, self.task, self.done, self.total, self.unit, **info)

    def close(self) -> None:
        if self.total is None or self.done < self.total:
            self.total = self.done
            tick(self.progress, self.task, self.done, self.total, self.unit)
