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


def test_use_threads_from_several_threads_leaves_torch_as_it_was():
    """Threads entering and leaving `use_threads` in turn restored each other's torch count: left at 1 for good."""
    import threading

    from mulfree.kernels import kernel_threads, use_threads

    torch.set_num_threads(2)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a():
        with use_threads(3, torch_ops=1):
            a_in.set()
            b_in.wait(5)
            seen["a"] = kernel_threads()
        a_out.set()

    def b():
        a_in.wait(5)
        with use_threads(5, torch_ops=1):
            b_in.set()
            a_out.wait(5)
            seen["b"] = kernel_threads()
            seen["torch while b"] = torch.get_num_threads()

    threads = [threading.Thread(target=f) for f in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == {"a": 3, "b": 5, "torch while b": 1}  # each thread's own kernel count
    assert torch.get_num_threads() == 2 and kernel_threads() == 2
    with use_threads(4, torch_ops=1), use_threads(6):
        assert kernel_threads() == 6 and torch.get_num_threads() == 1
    assert kernel_threads() == 2 and torch.get_num_threads() == 2
