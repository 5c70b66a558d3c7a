"""Torch's CPU thread count chosen by measured step time, so training keeps its speed on a shared machine.

With every core in use, one busy core stalls each parallel region on the thread that shares it (torch's
regions split work statically), and a 2-core host then runs slower on 2 threads than on 1. `ThreadTuner`
times one step at each thread count from 1 to the maximum every `period` steps and runs the rest of the
period on the fastest; steps are alike (equal tokens), so their times compare.
"""

from __future__ import annotations

import torch


class ThreadTuner:
    """Call `before(step)` and `after(step, seconds)` around each training step."""

    def __init__(self, max_threads: int | None = None, period: int = 50):
        self.max_threads = max(1, max_threads or torch.get_num_threads())
        self.period = max(period, self.max_threads + 1)
        self.times: dict[int, float] = {}
        self.best = self.max_threads

    def _probe(self, step: int) -> int | None:
        """The thread count step `step` measures, or None outside the probe steps; a period's first step is
        skipped (it can include a validation or checkpoint just before)."""
        k = step % self.period
        return self.max_threads - k + 1 if 1 <= k <= self.max_threads else None

    def before(self, step: int) -> None:
        if self.max_threads > 1:
            torch.set_num_threads(self._probe(step) or self.best)

    def after(self, step: int, seconds: float) -> None:
        probe = self._probe(step)
        if self.max_threads == 1 or probe is None:
            return
        self.times[probe] = seconds
        if probe == 1:
            self.best = min(self.times, key=self.times.get)
            self.times = {}
