"""Render library progress (cachekit.progress.Step) on stderr: tqdm bars on a terminal, else a line
every few seconds per task (and one when a task ends), so logs of batch jobs still show progress."""
from __future__ import annotations

import sys
import time

from cachekit.progress import Step


class ProgressView:
    """Callable: pass it as `progress=` to any library function. `quiet` shows nothing."""

    def __init__(self, quiet: bool = False, every: float = 10.0, stream=None):
        self.quiet = quiet
        self.every = every
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._bars: dict = {}
        self._last: dict = {}

    def __call__(self, step: Step) -> None:
        if self.quiet:
            return
        ended = step.total is not None and step.done >= step.total
        if self.tty:
            self._bar(step, ended)
        else:
            self._line(step, ended)

    def _bar(self, step: Step, ended: bool) -> None:
        from tqdm import tqdm

        bar = self._bars.get(step.task)
        if bar is None:
            bar = tqdm(total=step.total, desc=step.task, unit=step.unit, leave=False, file=self.stream,
                       unit_scale=step.unit == "img", initial=step.done)
            self._bars[step.task] = bar
        bar.total = step.total
        bar.n = step.done
        if step.info:
            bar.set_postfix(step.info, refresh=False)
        bar.refresh()
        if ended:
            bar.close()
            del self._bars[step.task]

    def _line(self, step: Step, ended: bool) -> None:
        now = time.monotonic()
        first = step.task not in self._last
        if not (first or ended or now - self._last[step.task] >= self.every):
            return
        if first and ended and step.done == 0:
            return
        self._last[step.task] = now
        total = f"/{step.total}" if step.total is not None else ""
        extra = "".join(f" {k}={v}" for k, v in step.info.items())
        print(f"[{step.task}] {step.done}{total} {step.unit}{extra}{' done' if ended else ''}",
              file=self.stream, flush=True)
        if ended:
            self._last.pop(step.task, None)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
