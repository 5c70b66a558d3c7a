"""ThreadTuner: the probe schedule and the choice, with step times given (no timing in tests)."""

from __future__ import annotations

import pytest
import torch

from mulfree.threads import ThreadTuner


@pytest.fixture(autouse=True)
def _keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def run(tuner: ThreadTuner, steps: range, seconds) -> list[int]:
    """The thread count of each step, when step s on k threads takes seconds(s, k)."""
    used = []
    for step in steps:
        tuner.before(step)
        used.append(torch.get_num_threads())
        tuner.after(step, seconds(step, used[-1]))
    return used


def test_probes_every_count_then_keeps_the_fastest():
    tuner = ThreadTuner(max_threads=3, period=8)
    used = run(tuner, range(16), lambda s, k: {1: 1.0, 2: 0.7, 3: 0.9}[k])
    assert used[1:4] == [3, 2, 1]  # the probe steps of the first period
    assert used[4:8] == [2, 2, 2, 2] and used[9:12] == [3, 2, 1] and used[12:] == [2, 2, 2, 2]


def test_follows_a_machine_that_gets_busy():
    idle, busy = {1: 1.0, 2: 0.6}, {1: 1.0, 2: 2.5}  # one core taken: 2 threads stall on it
    used = run(ThreadTuner(max_threads=2, period=10), range(30), lambda s, k: (idle if s < 10 else busy)[k])
    assert used[3:10] == [2] * 7 and used[13:20] == [1] * 7


def test_one_thread_never_changes_anything():
    torch.set_num_threads(1)
    assert run(ThreadTuner(period=5), range(12), lambda s, k: 1.0) == [1] * 12
