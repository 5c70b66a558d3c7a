"""The process-wide offline set-up: Hugging Face libraries never reach the network from `mulfree`.

Called once where the process starts (`mulfree.cli.main`). Library loaders do not touch `os.environ`;
they pass `local_files_only=True` instead. A user's own setting (e.g. `HF_DATASETS_OFFLINE=0` to let
lm-eval fetch a Hub task) wins.
"""

from __future__ import annotations

import os

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def setup() -> None:
    """Set the Hugging Face offline switches unless the environment already sets them."""
    for name in OFFLINE_VARIABLES:
        os.environ.setdefault(name, "1")
