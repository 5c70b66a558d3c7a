import os
import subprocess
import sys

# Triton reads this when it is imported, and torch.compile (tests/test_train.py) imports it before the Triton
# tests run: the kernels run in the interpreter on the CPU only if it is set before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from mulfree import offline

offline.setup()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def held_by_another_process(monkeypatch):
    """Hold a directory by `exclusive` in a child process for `seconds` (default: until the test ends), a command
    still running there; a lock held by another process is waited for 0.5 s instead of `LOCK_WAIT_S`."""
    monkeypatch.setattr("mulfree.atomic.LOCK_WAIT_S", 0.5)
    children = []

    def hold(path, seconds: float = 120) -> None:
        code = "import sys, time\nfrom mulfree.atomic import exclusive\nwith exclusive(sys.argv[1]):\n" \
               "    print('held', flush=True)\n    time.sleep(float(sys.argv[2]))\n"
        child = subprocess.Popen([sys.executable, "-c", code, str(path), str(seconds)], stdout=subprocess.PIPE,
                                 text=True)
        children.append(child)
        assert child.stdout.readline() == "held\n"

    yield hold
    for child in children:
        child.kill()
        child.wait()
