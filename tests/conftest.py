import os

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
